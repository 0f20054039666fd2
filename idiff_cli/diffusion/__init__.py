"""Denoising diffusion models: the pretrained θ0 that Implicit Diffusion finetunes (paper §2.2, App. A.2).

One file per concept, after score_sde's layout:

  sde.py         noise processes behind one interface: marginal mean α(t) and std σ(t), drift
                 f(x, t) = −½β(t)x and diffusion g(t) = √β(t); Ornstein–Uhlenbeck (MNIST) and the
                 cosine schedule of Nichol & Dhariwal (CIFAR-10, LSUN)
  unet.py        the Flax Linen U-Net ε_θ(x, t[, label]) and its presets
  losses.py      score_function (network -> score s_θ(x, t) = −ε_θ/σ(t)) and denoising score matching
  samplers.py    Euler–Maruyama on the reverse SDE, Euler on the probability-flow ODE, DDPM ancestral,
                 each as one pure `step` over a fixed time grid, and `sample` that scans it
  model.py       the model layer: U-Net, noise process, sampler and optimiser of a config; θ0 and
                 finetuned θ saved and loaded (`load(run_dir)`, pretrained.json / finetuned.json)
  options.py     the option schemas of `idiff pretrain` and `idiff sample` (JAX-free)
  pretrain.py    the pretraining task on the run loop: jitted sharded train step, EMA, grids, FID
  sample.py      `idiff sample`: images of a trained model as a PNG grid and an .npz
  figures.py     loss (and FID) curves from metrics.jsonl; `idiff report` of pretrain runs
"""
