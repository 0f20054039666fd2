"""LoRA adapters (idiff_cli/diffusion/lora.py): the merged kernel against the two-factor computation on a Dense
and a 3×3 and a 1×1 Conv; peft's initialisation; gradients through the merge against finite differences; a
LoRA file diffusers wrote (tests/fixtures/sd_tiny/lora, tools/make_lora_fixture.py) read onto the tiny SD-1.x
U-Net against diffusers' ε with it loaded; the names and shapes idiff writes against that file; a write/read
round trip; bad targets, ranks and files refused in one line."""

from __future__ import annotations

import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64
from safetensors.numpy import load_file, save_file

from idiff_cli.diffusion import lora
from idiff_cli.diffusion.diffusers_io import params_from_tensors
from idiff_cli.diffusion.sd_unet import CondUNet, cond_unet_fields, param_shapes
from idiff_cli.errors import UserError

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd_tiny"
LORA_FILE = FIXTURE / "lora" / lora.LORA_WEIGHTS
RANK, ALPHA = 2, 4.0  # the fixture's LoraConfig


class Tiny(nn.Module):
    """A Dense, a 3×3 Conv and a 1×1 Conv (named as diffusers names `to_out.0`), on a vector and an image."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, v, x):
        kw = dict(dtype=self.dtype, param_dtype=self.dtype)
        return (nn.Dense(5, name="proj", **kw)(v), nn.Conv(4, (3, 3), padding="SAME", name="conv", **kw)(x),
                nn.Conv(6, (1, 1), name="to_out__0", **kw)(x))


def _tiny(dtype=jnp.float32):
    model = Tiny(dtype)
    v, x = jnp.ones((2, 3), dtype), jnp.ones((2, 5, 5, 3), dtype)
    return model, model.init(jax.random.key(0), v, x), v, x


def _random(adapters, key=1, scale=0.5):
    """The adapters with random nonzero `up` factors (init's are zeros)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype) if p[-1].key == "up" else x
                                        for (p, x), k in zip(leaves, keys)])


@functools.cache
def _unet(name: str):
    """(network, variables, from the fixture's `name` pipeline's unet files)."""
    fields = cond_unet_fields(json.loads((FIXTURE / name / "unet" / "config.json").read_text()))
    model = CondUNet(**fields)
    tensors = load_file(str(FIXTURE / name / "unet" / "diffusion_pytorch_model.safetensors"))
    return model, params_from_tensors(param_shapes(model), tensors, name, what="UNet2DConditionModel")


def _conv_same(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """A stride-1 'SAME' convolution in float64 by its definition: y[b,i,j,o] = Σ x[b,i+a,j+c,:]·k[a,c,:,o]."""
    kh, kw = k.shape[:2]
    pad = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    h, w = x.shape[1:3]
    return sum(pad[:, a:a + h, c:c + w] @ k[a, c] for a in range(kh) for c in range(kw))


def test_merged_modules_equal_base_plus_scaled_factors():
    """Each merged module gives W x + b + s·B(A x), computed in float64 as peft does (A, then B; for a
    convolution, A as a conv of the kernel's size, B as a 1×1 conv). The Flax side runs in float32 on O(1)
    values with sums of ≤ 27 terms: 1e-5 is ~100 float32 ulps there (a wrong layout is off by O(1))."""
    model, params, _, _ = _tiny()
    rng = np.random.default_rng(0)
    v, x = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    spec = lora.LoRASpec(rank=2, alpha=3.0, targets=("proj", "conv", "to_out.0"))
    adapters = _random(lora.init(jax.random.key(1), params, spec))
    out = model.apply(lora.merge(params, adapters, spec.scale), v, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    a = jax.tree.map(lambda a: np.asarray(a, np.float64), adapters["params"])
    v64, x64, s = v.astype(np.float64), x.astype(np.float64), spec.scale
    dense = v64 @ p["proj"]["kernel"] + p["proj"]["bias"] + s * (v64 @ a["proj"]["down"]) @ a["proj"]["up"]
    convs = [_conv_same(x64, p[m]["kernel"]) + p[m]["bias"] + s * _conv_same(_conv_same(x64, a[m]["down"]), a[m]["up"])
             for m in ("conv", "to_out__0")]
    for got, want in zip(out, [dense, *convs]):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=1e-5)
    # the LoRA term matters at this size (else the check above would not see a wrong one)
    assert np.abs(np.asarray(out[0]) - model.apply(params, v, x)[0]).max() > 0.1


def test_init_is_peft_and_leaves_the_network_as_it_was():
    """down ~ U(±1/√fan_in) (fan_in = in·kh·kw: 3 for the Dense, 27 for the 3×3 conv), up zeros, float32 for a
    bfloat16 network; merged = base bit for bit, the untouched leaves the same objects."""
    _, params, _, _ = _tiny(jnp.bfloat16)
    spec = lora.LoRASpec(rank=64, alpha=8.0, targets=("proj", "conv"))  # 64 columns: samples fill the range
    adapters = lora.init(jax.random.key(0), params, spec)
    assert set(adapters["params"]) == {"proj", "conv"}
    for name, fan_in, (down, up) in (("proj", 3, ((3, 64), (64, 5))), ("conv", 27, ((3, 3, 3, 64), (1, 1, 64, 4)))):
        a = adapters["params"][name]
        assert (a["down"].shape, a["up"].shape) == (down, up)
        assert a["down"].dtype == a["up"].dtype == jnp.float32
        bound = 1 / np.sqrt(fan_in)
        assert 0.9 * bound < np.abs(a["down"]).max() <= bound
        assert not np.any(a["up"])
    merged = lora.merge(params, adapters, spec.scale)
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        assert got.dtype == want.dtype and np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert merged["params"]["proj"]["bias"] is params["params"]["proj"]["bias"]
    assert merged["params"]["to_out__0"] is params["params"]["to_out__0"]
    assert merged["params"]["proj"] is not params["params"]["proj"]  # params itself is left as it was


def test_gradient_through_merge_matches_finite_differences():
    """d loss / d adapters through merge and the network, against central differences, all in float64 (the
    adapters float64, so the delta is too): with step 1e-4 the O(h²) truncation is ~1e-8 relative and the
    rounding ~1e-12; 1e-6 relative is far above both and far below an error (a missing scale: 50%)."""
    with enable_x64(True):
        model, params, _, _ = _tiny(jnp.float64)
        rng = np.random.default_rng(1)
        v, x = jnp.asarray(rng.standard_normal((2, 3))), jnp.asarray(rng.standard_normal((2, 5, 5, 3)))
        spec = lora.LoRASpec(rank=2, alpha=3.0, targets=("proj", "conv", "to_out.0"))
        adapters = jax.tree.map(lambda a: a.astype(jnp.float64), _random(lora.init(jax.random.key(2), params, spec)))

        @jax.jit
        def loss(adapters):
            return sum(jnp.sum(jnp.sin(y)) for y in model.apply(lora.merge(params, adapters, spec.scale), v, x))

        grads = jax.grad(loss)(adapters)
        leaves, treedef = jax.tree.flatten(adapters)
        grad_leaves = jax.tree.leaves(grads)
        h = 1e-4
        for i, (leaf, grad) in enumerate(zip(leaves, grad_leaves)):
            for index in [(0,) * leaf.ndim, tuple(d - 1 for d in leaf.shape)]:
                def shifted(step):
                    moved = list(leaves)
                    moved[i] = leaf.at[index].add(step)
                    return loss(jax.tree.unflatten(treedef, moved))
                fd = (shifted(h) - shifted(-h)) / (2 * h)
                np.testing.assert_allclose(grad[index], fd, rtol=1e-6, atol=1e-10)


def _eps(params):
    model, _ = _unet("sd1")
    oracle = np.load(FIXTURE / "lora" / "oracle.npz")
    args = (params, jnp.asarray(oracle["z"].transpose(0, 2, 3, 1)), jnp.asarray(oracle["t"], jnp.float32),
            jnp.asarray(oracle["context"]))
    # tiny network: compiling dominates, XLA's backend optimisation level 0 halves it (as test_sd_unet.py)
    apply = jax.jit(model.apply).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(apply(*args), np.float64).transpose(0, 3, 1, 2), oracle


def test_diffusers_lora_file_matches_diffusers():
    """diffusers' LoRA file (peft names, lora_alpha 4 = 2·r in its metadata) read onto sd1's unet and merged:
    ε equals diffusers' ε with the LoRA loaded. Tolerance ten times test_sd_unet's (10 × diffusers' own
    float32 error + 1e-6): the merge rounds W + s·B·A once more than diffusers' W x + s·B(A x) (measured 7e-7).
    And the LoRA changes ε by O(1) (0.8), so reading the scale or the layout wrong cannot pass."""
    _, params = _unet("sd1")
    adapters, spec = lora.read(LORA_FILE, params)
    assert (spec.rank, spec.alpha, len(spec.targets)) == (RANK, RANK, 32)
    out, oracle = _eps(lora.merge(params, adapters, spec.scale))
    torch_error = np.abs(oracle["eps_lora"] - oracle["eps_lora_f64"]).max()
    np.testing.assert_allclose(out, oracle["eps_lora_f64"], rtol=0, atol=10 * (10 * torch_error + 1e-6))
    assert np.abs(out - oracle["eps_base"]).max() > 0.1


def test_older_diffusers_names_with_alpha_entries_read_the_same():
    """The same LoRA in diffusers' older format (".lora.down/.lora.up" names, "<module>.alpha" entries, no
    metadata) gives the same adapters; the peft names without the metadata read as scale 1 (as diffusers does)."""
    _, params = _unet("sd1")
    tensors = load_file(str(LORA_FILE))
    want, want_spec = lora.read(LORA_FILE, params)
    old = {}
    for key, value in tensors.items():
        module = key.rsplit(".lora_", 1)[0]
        old[key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")] = value
        old[module + ".alpha"] = np.array(ALPHA, np.float32)
    got, spec = lora.from_diffusers(old, params, "old.safetensors")
    bare, _ = lora.from_diffusers(tensors, params, "bare.safetensors")
    assert spec == want_spec == lora.LoRASpec(RANK, RANK, spec.targets)
    for g, w, b, (path, _) in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(bare),
                                  jax.tree_util.tree_flatten_with_path(want)[0]):
        np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(b if path[-1].key == "down" else ALPHA / RANK * b, w)


def test_written_names_and_shapes_are_diffusers():
    """idiff's state dict for rank 2 and the SD targets has exactly the keys and shapes of diffusers' file."""
    _, params = _unet("sd1")
    adapters = lora.init(jax.random.key(0), params, lora.LoRASpec(RANK, ALPHA, lora.SD_TARGETS))
    ours = lora.to_diffusers(adapters, RANK / ALPHA)
    theirs = load_file(str(LORA_FILE))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(v.dtype == np.float32 for v in ours.values())


def test_write_read_round_trip(tmp_path):
    """write folds α/r into B; read gives adapters whose merge with scale 1 is the original merge."""
    _, params, v, x = _tiny()
    spec = lora.LoRASpec(rank=3, alpha=6.0, targets=("proj", "conv", "to_out.0"))
    adapters = _random(lora.init(jax.random.key(3), params, spec))
    path = tmp_path / lora.LORA_WEIGHTS
    lora.write(path, adapters, spec.scale)
    back, read_spec = lora.read(path, params)
    assert read_spec == lora.LoRASpec(rank=3, alpha=3.0, targets=("conv", "proj", "to_out.0"))
    for got, want in zip(jax.tree.leaves(lora.merge(params, back, read_spec.scale)),
                         jax.tree.leaves(lora.merge(params, adapters, spec.scale))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert sorted(path.parent.iterdir()) == [path]  # atomic: no temporary file left


def _refused(match: str, call, *args):
    with pytest.raises(UserError, match=match) as info:
        call(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_targets_and_specs_are_refused():
    _, params = _unet("sd1")
    message = _refused("'attn1.to_z' matches no module", lora.select, params, ("to_q", "attn1.to_z"))
    assert "attn1.to_q" in message  # the closest suffixes
    _refused("no LoRA target", lora.select, params, ())
    _refused("--lora-rank must be >= 1, got 0", lora.check_spec, 0, 1.0)
    _refused("--lora-alpha must be > 0", lora.check_spec, 4, 0.0)
    _refused("--lora-rank", lora.init, jax.random.key(0), params, lora.LoRASpec(0, 1.0, lora.SD_TARGETS))
    names = lora.select(params, ("attn1.to_out.0", "proj_in"))
    assert names[0] == "down_blocks.0.attentions.0.proj_in" and len(names) == 8  # 4 transformer blocks


def test_bad_files_are_refused(tmp_path):
    _, sd1 = _unet("sd1")
    _, sd2 = _unet("sd2")  # narrower, and Linear projections: sd1's file cannot fit it
    _refused("shapes .* needs", lora.read, LORA_FILE, sd2)
    tensors = load_file(str(LORA_FILE))
    bare = {k.removeprefix("unet."): v for k, v in tensors.items()}
    _refused("lacks the 'unet.' prefix", lora.from_diffusers, bare, sd1, "f")
    _refused("which the network lacks", lora.from_diffusers,
             {"unet.down_blocks.7.attn.to_q.lora_A.weight": np.zeros((2, 16), np.float32)}, sd1, "f")
    key = sorted(tensors)[0].replace("lora_A", "lora_B")
    _refused("ranks differ", lora.from_diffusers, {**tensors, key: np.zeros((16, 3), np.float32),
                                                   key.replace("lora_B", "lora_A"): np.zeros((3, 16), np.float32)},
             sd1, "f")
    _refused("no LoRA weights", lora.from_diffusers, {}, sd1, "f")
    save_file({}, str(tmp_path / "empty.safetensors"))
    _refused("no LoRA weights", lora.read, tmp_path / "empty.safetensors", sd1)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    _refused("cannot read", lora.read, tmp_path / "junk.safetensors", sd1)
