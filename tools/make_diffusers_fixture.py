"""Writes the diffusers oracle fixture of `idiff import` under tests/fixtures/diffusers_tiny/.

Run once, in a throwaway environment with torch and diffusers (not a dependency of idiff):

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.14.1 diffusers==0.42.1 safetensors==0.8.0 numpy==2.4.6
    /tmp/torchenv/bin/python tools/make_diffusers_fixture.py

It writes, from fixed seeds:

* `model/`: a tiny random `UNet2DModel` (16×16 RGB, block_out_channels (16, 32), one layer per block,
  8 norm groups, an AttnDownBlock2D/AttnUpBlock2D pair with 4 heads of 8 channels, the
  `google/ddpm-cifar10-32` time embedding and downsample padding) in the diffusers format
  (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json). Its GroupNorm scales
  and biases are randomised too, so that a mapping that swaps them cannot pass.
* `unet_oracle.npz`: x [2, 3, 16, 16] (NCHW), integer timesteps t [2] and diffusers' output ε [2, 3, 16, 16].
* `scheduler_oracle.json`: per scheduler configuration, the respaced timesteps of `set_timesteps(n)` and
  `DDPMScheduler.step` (and, for `leading` spacing, `DDIMScheduler.step` with η = 0) on fixed
  (sample, model output, noise) at a few indices, the noise made explicit.
* `ddpm_cifar10_32.json`: the config.json and scheduler_config.json fields of `google/ddpm-cifar10-32`
  (written out here: the files cannot be downloaded on the machines that run the tests) and the
  parameter count of `UNet2DModel(**config)` as diffusers counts it.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "diffusers_tiny"

TINY = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
            norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, flip_sin_to_cos=False,
            freq_shift=1, downsample_padding=0, norm_eps=1e-6)
TINY_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                      clip_sample=True, variance_type="fixed_large")

# google/ddpm-cifar10-32: config.json and scheduler_config.json (Ho et al. 2020's CIFAR-10 model, 35.7 M
# parameters: unconditional, linear betas, fixed_large variance).
CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, center_input_sample=False,
               time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
               down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
               block_out_channels=[128, 256, 256, 256], layers_per_block=2, mid_block_scale_factor=1,
               downsample_padding=0, act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6)
CIFAR10_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         clip_sample=True, variance_type="fixed_large", trained_betas=None)

# Scheduler configurations of the oracle: each schedule, both variances, both prediction types, clipping
# on and off, the three timestep spacings and a steps_offset.
SCHEDULERS = [
    (dict(TINY_SCHEDULER), 10),
    (dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012,
          clip_sample=False, variance_type="fixed_small", prediction_type="v_prediction",
          timestep_spacing="leading", steps_offset=1), 20),
    (dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=0.5,
          variance_type="fixed_small", timestep_spacing="trailing"), 7),
    (dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, variance_type="fixed_large",
          timestep_spacing="linspace"), 16),
]


def tiny_model() -> UNet2DModel:
    torch.manual_seed(0)
    model = UNet2DModel(**TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def unet_oracle(model: UNet2DModel) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        eps = model(x, t).sample
    return {"x": x.numpy(), "t": t.numpy(), "eps": eps.numpy()}


def scheduler_cases() -> list[dict]:
    cases = []
    g = torch.Generator().manual_seed(2)
    for fields, n in SCHEDULERS:
        ddpm = DDPMScheduler(**fields)
        ddpm.set_timesteps(n)
        timesteps = ddpm.timesteps.tolist()
        steps = []
        for index in (0, n // 2, n - 1):
            t = timesteps[index]
            sample = torch.randn(2, 3, 4, 4, generator=g)
            output = torch.randn(2, 3, 4, 4, generator=g)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            prev = ddpm.step(output, t, sample, generator=torch.Generator().manual_seed(seed)).prev_sample
            noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
            step = {"index": index, "t": t, "sample": sample.tolist(), "model_output": output.tolist(),
                    "noise": noise.tolist(), "ddpm": prev.tolist()}
            if fields.get("timestep_spacing", "leading") == "leading":
                ddim = DDIMScheduler.from_config(ddpm.config)
                ddim.set_timesteps(n)
                assert ddim.timesteps.tolist() == timesteps
                step["ddim"] = ddim.step(output, t, sample, eta=0.0).prev_sample.tolist()
            steps.append(step)
        config = {k: v for k, v in ddpm.config.items() if not k.startswith("_")}
        cases.append({"config": config, "n": n, "timesteps": timesteps, "steps": steps})
    return cases


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    model = tiny_model()
    model.save_pretrained(OUT / "model", safe_serialization=True)
    DDPMScheduler(**TINY_SCHEDULER).save_pretrained(OUT / "model")
    np.savez(OUT / "unet_oracle.npz", **unet_oracle(model))
    (OUT / "scheduler_oracle.json").write_text(json.dumps(scheduler_cases()) + "\n")
    count = sum(p.numel() for p in UNet2DModel(**CIFAR10).parameters())
    (OUT / "ddpm_cifar10_32.json").write_text(json.dumps(
        {"config": {"_class_name": "UNet2DModel", **CIFAR10},
         "scheduler": {"_class_name": "DDPMScheduler", **CIFAR10_SCHEDULER},
         "parameters": count}, indent=1) + "\n")
    tiny = sum(p.numel() for p in model.parameters())
    print(f"wrote {OUT}: tiny model {tiny} parameters; ddpm-cifar10-32 {count} parameters "
          f"(torch {torch.__version__}, python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
