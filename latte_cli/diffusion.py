"""Gaussian diffusion as improved DDPM defines it and DiT and Latte train it: the model predicts eps and,
with learn_sigma, a variance between beta_t and the clipped posterior variance; the loss is the hybrid
L_simple + L_vlb; sampling is ancestral (DDPM) or DDIM on an evenly respaced subset of the steps, with
classifier-free guidance on top.

Sources: "DDPM" Ho et al. 2020, "IDDPM" Nichol and Dhariwal 2021, "DDIM" Song et al. 2021.
Shapes: B batch, F frames, C channels, H W latent size. Every tensor is a video (B, F, C, H, W), so the
channel axis is 2; a learned-sigma model returns (B, F, 2C, H, W): eps, then the variance values v.
Timesteps t are LongTensors (B,) indexing the (respaced) arrays; the model is given timestep_map[t], the
index in the original process, so one network serves every respacing.
"""

import itertools
import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

Generators = torch.Generator | list[torch.Generator] | None


def randn(shape, generator: Generators, device, dtype=torch.float32) -> Tensor:
    """N(0, I) noise. With a list of generators row b comes from generator[b], so a sample is the same
    whatever batch it is drawn in; noise is drawn on the generator's device, so a seed gives the same
    video on any device."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    src = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=src, dtype=dtype).to(device)


def get_betas(schedule: str, steps: int) -> np.ndarray:
    if schedule == "linear":  # DDPM's 1e-4 to 0.02 over 1000 steps, scaled by 1000/steps (IDDPM)
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    if schedule == "cosine":  # IDDPM eq. 17 with s = 0.008; betas capped at 0.999 as near t = T they reach 1
        f = lambda t: math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(steps)], dtype=np.float64)
    raise ValueError(f"unknown noise schedule {schedule!r}; use linear or cosine")


def space_timesteps(steps: int, respacing: str) -> list[int]:
    """The steps kept from the original process (IDDPM sec. 4). "ddimN": every k-th step from 0, k chosen
    to give exactly N (DDIM's stride). "a,b,c": the steps cut into equal sections, a, b, c evenly strided
    steps taken from each, first and last of a section included."""
    spec = respacing[4:] if respacing.startswith("ddim") else respacing
    if not all(c.strip().isdigit() for c in spec.split(",")):
        raise ValueError(f"cannot read respacing {respacing!r}; use e.g. 250, ddim50 or 10,15,20")
    if respacing.startswith("ddim"):
        for stride in range(1, steps + 1):
            if len(range(0, steps, stride)) == int(spec):
                return list(range(0, steps, stride))
        raise ValueError(f"{steps} steps cannot be strided into exactly {spec} DDIM steps")
    counts = [int(c) for c in spec.split(",")]
    size, extra = divmod(steps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        n = size + (i < extra)
        if not 1 <= count <= n:
            raise ValueError(f"cannot take {count} steps from a section of {n} in respacing {respacing!r}")
        stride = (n - 1) / (count - 1) if count > 1 else 1
        # positions summed stride by stride, so that rounding picks the same steps as IDDPM's code
        kept += [start + round(x) for x in itertools.accumulate([0.0] + [stride] * (count - 1))]
        start += n
    return sorted(set(kept))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise."""
    return 0.5 * (
        logvar2 - logvar1 - 1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) in nats of data on 256 levels in [-1, 1] under N(means, exp(log_scales)^2), integrated over
    the bin of width 2/255 around x; the edge bins reach to -inf and +inf (DDPM eq. 13)."""
    inv_std = torch.exp(-log_scales)
    upper, lower = inv_std * (x - means + 1 / 255), inv_std * (x - means - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    log_mid = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


class Diffusion:
    def __init__(self, steps: int = 1000, schedule: str = "linear", learn_sigma: bool = True,
                 respacing: str | None = None):
        kept = space_timesteps(steps, respacing) if respacing else list(range(steps))
        if len(kept) < 2:
            raise ValueError("sampling needs at least 2 diffusion steps")
        self.learn_sigma = learn_sigma
        self.num_timesteps = len(kept)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        # A respaced process keeps alphas_cumprod at the kept steps; its betas follow (IDDPM sec. 4).
        self.alphas_cumprod = np.cumprod(1 - get_betas(schedule, steps))[kept]
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.betas = 1 - self.alphas_cumprod / self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1 / self.alphas_cumprod - 1)
        # Posterior q(x_{t-1} | x_t, x_0), DDPM eq. 6-7.
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1 (IDDPM).
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1],
                                                               self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1 - self.alphas_cumprod_prev) * np.sqrt(1 - self.betas)
                                     / (1 - self.alphas_cumprod))
        # Without learn_sigma: the fixed large variance beta_t (DDPM sec. 3.2), the default of DiT and Latte,
        # its first entry the posterior variance at t = 1 for a better decoder likelihood (IDDPM).
        self.fixed_log_variance = np.log(np.append(self.posterior_variance[1], self.betas[1:]))

    def _at(self, a: np.ndarray, t: Tensor, x: Tensor) -> Tensor:
        """a[t] shaped (B, 1, 1, 1, 1) to broadcast against x, in float32 or better."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return torch.as_tensor(a[t.cpu().numpy()], dtype=dtype, device=x.device).view(-1, *[1] * (x.ndim - 1))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(alphas_cumprod) x_0, (1 - alphas_cumprod) I), DDPM eq. 4."""
        at = lambda a: self._at(a, t, x0)
        return at(self.sqrt_alphas_cumprod) * x0 + at(self.sqrt_one_minus_alphas_cumprod) * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0), DDPM eq. 7."""
        at = lambda a: self._at(a, t, x_t)
        mean = at(self.posterior_mean_coef1) * x0 + at(self.posterior_mean_coef2) * x_t
        return mean, at(self.posterior_variance), at(self.posterior_log_variance_clipped)

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 from x_t and eps, DDPM eq. 15."""
        at = lambda a: self._at(a, t, x_t)
        return at(self.sqrt_recip_alphas_cumprod) * x_t - at(self.sqrt_recipm1_alphas_cumprod) * eps

    def p_mean_variance(self, out: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False) -> dict:
        """p(x_{t-1} | x_t) from the model output: mean, log variance, and the x_0 and eps it implies."""
        at = lambda a: self._at(a, t, x_t)
        C = x_t.shape[2]
        if out.shape[2] != (2 if self.learn_sigma else 1) * C:
            raise ValueError(f"the model returned {out.shape[2]} channels for {C} latent channels, which "
                             f"does not fit learn_sigma={self.learn_sigma}")
        eps = out[:, :, :C]
        if self.learn_sigma:
            # IDDPM eq. 15: v in [-1, 1] interpolates the log variance between the clipped posterior variance
            # (v = -1) and beta_t (v = 1).
            frac = (out[:, :, C:] + 1) / 2
            min_log, max_log = at(self.posterior_log_variance_clipped), at(np.log(self.betas))
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            log_variance = at(self.fixed_log_variance).expand_as(x_t)
        x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:  # and eps re-derived from the clipped x_0, which DDIM uses
            x0 = x0.clamp(-1, 1)
            eps = (at(self.sqrt_recip_alphas_cumprod) * x_t - x0) / at(self.sqrt_recipm1_alphas_cumprod)
        mean = self.q_posterior(x0, x_t, t)[0]  # DDPM eq. 11, as the posterior mean at the predicted x_0
        return {"mean": mean, "log_variance": log_variance, "pred_x0": x0, "eps": eps}

    def training_losses(self, model, x0: Tensor, t: Tensor, model_kwargs: dict | None = None,
                        noise: Tensor | None = None, frame_mask: Tensor | None = None,
                        generator: Generators = None) -> dict[str, Tensor]:
        """Per-sample hybrid loss as DiT trains it: loss = mse + vb, mse the eps MSE (L_simple, DDPM eq. 14)
        averaged over elements, vb the L_vlb term of this t in bits per element (0 without learn_sigma).
        IDDPM eq. 16 weights L_vlb, a sum of T such terms, by 0.001: at T = 1000 that is vb's weight 1, which
        DiT keeps for any T. Only frames with frame_mask 1 count."""
        B, F, C = x0.shape[:3]
        noise = randn(x0.shape, generator, x0.device, x0.dtype) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))
        w = torch.ones(B, F, device=x0.device) if frame_mask is None else frame_mask.float().to(x0.device)
        w = w.view(B, F, 1, 1, 1).expand_as(x0)
        mean_flat = lambda v: (v * w).sum(dim=(1, 2, 3, 4)) / w.sum(dim=(1, 2, 3, 4)).clamp(min=1)
        mse = mean_flat((noise - out[:, :, :C].float()) ** 2)
        vb = torch.zeros_like(mse)
        if self.learn_sigma:
            # L_vlb trains only the variance: the gradient into the mean is stopped (IDDPM sec. 3.1).
            frozen = torch.cat([out[:, :, :C].detach(), out[:, :, C:]], dim=2)
            p = self.p_mean_variance(frozen, x_t, t)
            true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
            kl = normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])  # L_{t-1}, DDPM eq. 5
            nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])  # L_0
            vb = mean_flat(torch.where(t.view(-1, 1, 1, 1, 1) == 0, nll, kl)) / math.log(2.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def p_sample_loop(self, model, shape, noise: Tensor | None = None, model_kwargs: dict | None = None,
                      generator: Generators = None, clip_denoised: bool = False,
                      callback: Callable | None = None, replace: Callable | None = None,
                      device=None) -> Tensor:
        """Ancestral sampling (DDPM algorithm 2) with the model's variance."""
        return self._sample(model, shape, noise, model_kwargs, generator, clip_denoised, callback, replace,
                            device, eta=None)

    def ddim_sample_loop(self, model, shape, noise: Tensor | None = None, model_kwargs: dict | None = None,
                         generator: Generators = None, eta: float = 0.0, clip_denoised: bool = False,
                         callback: Callable | None = None, replace: Callable | None = None,
                         device=None) -> Tensor:
        """DDIM sampling: eta = 0 is deterministic, eta = 1 has DDPM's posterior variance."""
        return self._sample(model, shape, noise, model_kwargs, generator, clip_denoised, callback, replace,
                            device, eta=eta)

    @torch.no_grad()
    def _sample(self, model, shape, noise, model_kwargs, generator, clip_denoised, callback, replace, device,
                eta: float | None) -> Tensor:
        """From x_T (noise, or drawn on device, "cpu" if None) to x_0. replace(x_t, t) may overwrite parts of
        x_t (known frames) before each model call; callback(i, num_steps, x_t) follows each step, i counting
        the steps done."""
        x = randn(shape, generator, device or "cpu") if noise is None else noise
        timestep_map = self.timestep_map.to(x.device)
        for n, i in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            if replace is not None:
                x = replace(x, t)
            p = self.p_mean_variance(model(x, timestep_map[t], **(model_kwargs or {})), x, t, clip_denoised)
            if eta is None:  # x_{t-1} ~ N(mean, exp(log_variance)), no noise at the last step
                z = randn(shape, generator, x.device, x.dtype) if i else torch.zeros_like(x)
                x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z
            else:  # DDIM eq. 12, sigma from eq. 16 scaled by eta
                a, a_prev = self._at(self.alphas_cumprod, t, x), self._at(self.alphas_cumprod_prev, t, x)
                sigma = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
                x = torch.sqrt(a_prev) * p["pred_x0"] + torch.sqrt(1 - a_prev - sigma**2) * p["eps"]
                if i and eta:
                    x = x + sigma * randn(shape, generator, x.device, x.dtype)
            if callback is not None:
                callback(n + 1, self.num_timesteps, x)
        return x


def classifier_free_guidance(model, scale: float, uncond_kwargs: dict) -> Callable:
    """Wraps model for classifier-free guidance (Ho and Salimans 2022): one call on the batch doubled, the
    second half with uncond_kwargs; eps = eps_u + scale (eps_c - eps_u) on every latent channel, the
    variance channels (if any) from the conditional half."""
    def guided(x: Tensor, t: Tensor, **kwargs) -> Tensor:
        uncond = {**kwargs, **uncond_kwargs}
        both = {k: torch.cat([kwargs[k], v]) if torch.is_tensor(v) else v for k, v in uncond.items()}
        cond_out, uncond_out = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        C = x.shape[2]
        eps = uncond_out[:, :, :C] + scale * (cond_out[:, :, :C] - uncond_out[:, :, :C])
        return torch.cat([eps, cond_out[:, :, C:]], dim=2)
    return guided


def given_frames(model, x_given: Tensor) -> Callable:
    """Frame conditioning (Video LDM's masked prediction, LVDM's conditional frames): where mask (B, F) is 1
    the model sees x_given (clean latents, lightly noised by the forward process) in place of x_t, and the
    mask itself travels as an input channel. A zero mask leaves x_t alone, which is the unconditional model
    that guidance contrasts with."""
    def conditioned(x: Tensor, t: Tensor, mask: Tensor, **kwargs) -> Tensor:
        keep = mask.bool()[:, :, None, None, None]
        given = x_given.repeat(len(x) // len(x_given), 1, 1, 1, 1)  # inside guidance the batch is doubled
        return model(torch.where(keep, given.to(x.dtype), x), t, mask=mask, **kwargs)
    return conditioned
