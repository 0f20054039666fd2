"""The U-Net: shapes, the ≈1 M-parameter CPU preset, the paper's CIFAR-10 size, label conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idiff_cli.diffusion.architectures import cpu_architecture, paper_architecture
from idiff_cli.diffusion.unet import UNet, upsample_nearest


def n_params(model, size, channels):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)),
                                               jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))
    return sum(x.size for x in jax.tree.leaves(shapes))


def test_preset_sizes():
    assert 0.9e6 < n_params(UNet(**cpu_architecture(28)), 28, 1) < 1.3e6
    # Ho et al.'s CIFAR-10 network has 35.7 M parameters.
    assert abs(n_params(UNet(**paper_architecture(32)), 32, 3) - 35.7e6) < 0.1e6


@pytest.mark.slow  # compiles several U-Nets
def test_forward_shapes_zero_init_output_and_label_conditioning():
    model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), groups=4, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
    level, labels = jnp.array([0.1, 0.5, 0.9]), jnp.array([0, 1, 2])
    params = jax.jit(model.init)(jax.random.key(1), x, level, labels)
    apply = jax.jit(model.apply)
    out = apply(params, x, level, labels)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised output: the untrained ε̂ is 0
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    a = apply(noisy, x, level, labels)
    b = apply(noisy, x, level, jnp.array([5, 6, 7]))
    c = apply(noisy, x, jnp.array([0.2, 0.6, 0.3]), labels)
    assert float(jnp.abs(a - b).mean()) > 1e-3 and float(jnp.abs(a - c).mean()) > 1e-3


def test_image_sizes_the_model_cannot_take():
    assert UNet.cannot_take(28, (1, 2, 2)) is None
    assert UNet.cannot_take(32, (1, 2, 2, 2)) is None
    assert "multiple of 4" in UNet.cannot_take(30, (1, 2, 2))


def test_upsample_nearest_is_resize_nearest_and_so_is_its_gradient():
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
    g = jax.random.normal(jax.random.key(1), (2, 6, 10, 4))
    resize = lambda y: jax.image.resize(y, (2, 6, 10, 4), "nearest")  # noqa: E731
    ours, vjp = jax.vjp(upsample_nearest, x)
    theirs, vjp_resize = jax.vjp(resize, x)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(vjp(g)[0], vjp_resize(g)[0], rtol=1e-6, atol=1e-6)


def test_group_norm_matches_flax_values_and_gradients():
    import flax.linen as nn

    from idiff_cli.diffusion.unet import GroupNorm

    x = 2.0 * jax.random.normal(jax.random.key(0), (3, 6, 5, 16)) + 1.0
    g = jax.random.normal(jax.random.key(1), x.shape)
    theirs = nn.GroupNorm(4)
    variables = theirs.init(jax.random.key(2), x)
    variables = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(3), p.shape), variables)

    def loss(module):
        return lambda v, y: jnp.sum(nn.silu(module.apply(v, y)) * g)

    ours_value, ours_grads = jax.value_and_grad(loss(GroupNorm(4)), argnums=(0, 1))(variables, x)
    value, grads = jax.value_and_grad(loss(theirs), argnums=(0, 1))(variables, x)
    np.testing.assert_allclose(ours_value, value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
