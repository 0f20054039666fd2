"""Implicit Diffusion for denoising diffusion models (paper §3.3, §5.2): the queue of Algorithm 2, the
adjoint gradients through the sampler, the Girsanov KL, rewards, baselines and the finetuning loop."""
