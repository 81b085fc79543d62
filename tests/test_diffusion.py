"""The diffusion maths against the published formulas, recomputed here independently in float64, and end to
end on Gaussian data, where the optimal noise predictor and the true reverse process are known in closed
form."""

import math

import numpy as np
import pytest
import torch

from latte_cli.diffusion import (
    Diffusion,
    classifier_free_guidance,
    discretized_gaussian_log_likelihood,
    normal_kl,
    randn,
    space_timesteps,
)

T = 1000
DDPM_BETAS = np.linspace(1e-4, 0.02, T)  # Ho et al. 2020, sec. 4
ALPHAS_CUMPROD = np.cumprod(1 - DDPM_BETAS)


class GaussianOracle:
    """The optimal predictor for data x_0 ~ N(mu, s^2) in every element. x_t = a x_0 + b eps is Gaussian with
    variance a^2 s^2 + b^2, so E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2). With learn_sigma it also
    returns the v that gives the true reverse variance Var(x_{t-1} | x_t) = V_{t-1} beta_t / V_t of the
    (respaced) chain, V_t = Var(x_t), which lies between the posterior variance and beta_t when s < 1."""

    def __init__(self, mu: float, s: float, diffusion: Diffusion | None = None, v: float | None = None):
        self.mu, self.s, self.diffusion, self.v = mu, s, diffusion, v
        self.calls = []

    def __call__(self, x, t):
        self.calls.append(t.clone())
        view = lambda a: torch.as_tensor(a).view(-1, 1, 1, 1, 1).expand_as(x)
        abar = ALPHAS_CUMPROD[t.numpy()]
        var_t = abar * self.s**2 + 1 - abar
        eps = view(np.sqrt(1 - abar) / var_t) * (x.double() - view(np.sqrt(abar) * self.mu))
        if self.diffusion is None:
            return eps.to(x.dtype)
        if self.v is not None:
            return torch.cat([eps, torch.full_like(eps, self.v)], dim=2).to(x.dtype)
        kept = self.diffusion.timestep_map.numpy()
        chain = np.append(1.0, ALPHAS_CUMPROD[kept])  # chain[i]: alphas_cumprod before respaced step i
        i = np.searchsorted(kept, t.numpy())
        beta = 1 - abar / chain[i]
        true_var = (chain[i] * self.s**2 + 1 - chain[i]) * beta / var_t
        j = np.maximum(i, 1)  # the posterior variance at 0 is clipped to its value at 1
        posterior_var = (1 - chain[j + 1] / chain[j]) * (1 - chain[j]) / (1 - chain[j + 1])
        v = 2 * np.log(true_var / posterior_var) / np.log(beta / posterior_var) - 1
        return torch.cat([eps, view(v)], dim=2).to(x.dtype)


def mean_std(x):
    return x.double().mean().item(), x.double().std().item()


# ---------------------------------------------------------------------------------------------- schedules


def test_schedules_follow_the_published_formulas():
    d = Diffusion()
    assert d.betas.dtype == np.float64 and d.num_timesteps == T
    np.testing.assert_allclose(d.betas, DDPM_BETAS, rtol=1e-10)
    np.testing.assert_allclose(d.alphas_cumprod, ALPHAS_CUMPROD, rtol=1e-12)
    # linear, other lengths: scaled by 1000 / steps (IDDPM), so 4000 steps run from 2.5e-5 to 0.005
    np.testing.assert_allclose(Diffusion(steps=4000).betas, np.linspace(2.5e-5, 0.005, 4000), rtol=1e-9)
    # cosine: alphas_cumprod = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2 (IDDPM eq. 17), while
    # no beta is capped at 0.999 (the last steps are)
    cos = Diffusion(schedule="cosine", learn_sigma=False)
    f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(cos.alphas_cumprod[:990], f(np.arange(1, 991)) / f(0), rtol=1e-9)
    assert cos.betas.max() <= 0.999 + 1e-12


def test_schedules_match_diffusers():
    from diffusers import DDPMScheduler

    for ours, theirs in (("linear", "linear"), ("cosine", "squaredcos_cap_v2")):
        ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs)
        np.testing.assert_allclose(Diffusion(schedule=ours).alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-4)


def test_bad_options_are_reported():
    with pytest.raises(ValueError, match="schedule"):
        Diffusion(schedule="quadratic")
    for bad in ("fast", "ddim", "ddim999", "2000", "10,x"):
        with pytest.raises(ValueError, match="respacing|DDIM"):
            Diffusion(respacing=bad)
    with pytest.raises(ValueError, match="channels"):
        Diffusion(learn_sigma=True).p_sample_loop(GaussianOracle(0.0, 1.0), (1, 1, 1, 1, 1))


# ---------------------------------------------------------------------------------------------- q and posterior


def test_q_sample_moments_monte_carlo():
    d = Diffusion()
    n = 200_000
    x0 = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64).view(1, 1, 3, 1, 1).expand(n, 1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    for step in (0, 100, 500, 999):
        t = torch.full((n,), step)
        x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        a = ALPHAS_CUMPROD[step]
        se = math.sqrt((1 - a) / n)  # standard error of the mean
        np.testing.assert_allclose(x_t.mean(0).flatten(), math.sqrt(a) * x0[0].flatten(), atol=5 * se)
        np.testing.assert_allclose(x_t.var(0).flatten(), np.full(3, 1 - a), rtol=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("respacing", [None, "250"])
def test_posterior_is_bayes_rule(respacing):
    d = Diffusion(respacing=respacing)
    kept = d.timestep_map.numpy()
    abar, abar_prev = ALPHAS_CUMPROD[kept[1:]], ALPHAS_CUMPROD[kept[:-1]]
    alpha = abar / abar_prev  # q(x_t | x_{t-1}) = N(sqrt(alpha) x_{t-1}, 1 - alpha) in the respaced chain
    # prior x_{t-1} | x_0 ~ N(sqrt(abar_prev) x0, 1 - abar_prev) times the likelihood of x_t given x_{t-1}
    rng = np.random.default_rng(0)
    x0, x_t = rng.normal(size=len(kept) - 1), rng.normal(size=len(kept) - 1)
    precision = 1 / (1 - abar_prev) + alpha / (1 - alpha)
    mean = (np.sqrt(abar_prev) * x0 / (1 - abar_prev) + np.sqrt(alpha) * x_t / (1 - alpha)) / precision
    t = torch.arange(1, len(kept))
    shape = lambda v: torch.as_tensor(v).view(-1, 1, 1, 1, 1)
    ours_mean, ours_var, ours_log_var = d.q_posterior(shape(x0), shape(x_t), t)
    np.testing.assert_allclose(ours_mean.flatten(), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours_var.flatten(), 1 / precision, rtol=1e-9)
    np.testing.assert_allclose(ours_log_var.flatten(), -np.log(precision), rtol=1e-9)
    # t = 0: the posterior is the point x_0; its log variance is clipped to the value at t = 1
    m0, v0, lv0 = d.q_posterior(shape(x0[:1]), shape(x_t[:1]), torch.zeros(1, dtype=torch.long))
    np.testing.assert_allclose(m0.item(), x0[0], atol=1e-12)
    assert v0.item() == 0 and lv0.item() == pytest.approx(-np.log(precision[0]), rel=1e-9)


def test_predict_x0_inverts_q_sample():
    d = Diffusion()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 2, 5, 5, generator=g), torch.randn(4, 3, 2, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(d.predict_x0(d.q_sample(x0, t, eps), t, eps), x0, atol=2e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------- vlb pieces


def test_normal_kl():
    m, lv = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-12
    m2, lv2 = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    normal = lambda mean, log_var: torch.distributions.Normal(mean, (0.5 * log_var).exp())
    ref = torch.distributions.kl_divergence(normal(m, lv), normal(m2, lv2))
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), ref)


def test_discretized_gaussian_log_likelihood():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    # a point mass on the data: probability 1, log 0
    point = discretized_gaussian_log_likelihood(levels, levels, torch.full_like(levels, -12.0))
    assert point.abs().max() < 1e-6
    # a wide Gaussian: the bin mass from the normal CDF (math.erf); the edge bins extend to infinity
    mean, std = 0.1, 0.4
    cdf = lambda z: 0.5 * (1 + math.erf((z - mean) / (std * math.sqrt(2))))
    ours = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                               torch.full_like(levels, math.log(std)))
    for k in (0, 1, 100, 128, 254, 255):
        x = levels[k].item()
        hi = 1.0 if k == 255 else cdf(x + 1 / 255)
        lo = 0.0 if k == 0 else cdf(x - 1 / 255)
        assert ours[k].item() == pytest.approx(math.log(hi - lo), rel=1e-6)


def test_learned_variance_range():
    d = Diffusion()
    t = torch.tensor([0, 1, 250, 999])
    x = torch.zeros(4, 2, 3, 4, 4, dtype=torch.float64)
    lo = np.log(np.append(d.posterior_variance[1], d.posterior_variance[1:]))[t]
    for v, expected in ((1.0, np.log(DDPM_BETAS[t])), (-1.0, lo), (0.0, (np.log(DDPM_BETAS[t]) + lo) / 2)):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=2)
        log_var = d.p_mean_variance(out, x, t)["log_variance"]
        assert log_var.shape == x.shape
        np.testing.assert_allclose(log_var[:, 0, 0, 0, 0], expected, rtol=1e-6)
    # without learn_sigma: fixed large, beta_t, its first entry the posterior variance at t = 1
    fixed = Diffusion(learn_sigma=False).p_mean_variance(torch.zeros_like(x), x, t)["log_variance"]
    np.testing.assert_allclose(fixed[:, 0, 0, 0, 0], np.append(lo[0], np.log(DDPM_BETAS[t[1:]])), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- respacing


def test_respacing_all_steps_is_the_original_process():
    full = Diffusion()
    for spec in ("1000", "ddim1000"):
        d = Diffusion(respacing=spec)
        assert d.timestep_map.tolist() == list(range(T))
        for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                     "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
            np.testing.assert_array_equal(getattr(d, name), getattr(full, name))
    shape = (3, 2, 1, 2, 2)
    a = full.p_sample_loop(GaussianOracle(0.5, 0.5, full, 0.2), shape, generator=torch.Generator().manual_seed(3))
    d = Diffusion(respacing="1000")
    b = d.p_sample_loop(GaussianOracle(0.5, 0.5, d, 0.2), shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_respaced_steps():
    full = Diffusion()
    for spec, n in (("250", 250), ("ddim50", 50), ("10,15,20", 45), ("25", 25)):
        d = Diffusion(respacing=spec)
        kept = d.timestep_map.numpy()
        assert d.num_timesteps == n == len(kept) and kept[0] == 0 and (np.diff(kept) > 0).all()
        np.testing.assert_array_equal(d.alphas_cumprod, full.alphas_cumprod[kept])
        # the respaced betas give back alphas_cumprod (IDDPM eq. 19)
        np.testing.assert_allclose(np.cumprod(1 - d.betas), d.alphas_cumprod, rtol=1e-12)
    assert Diffusion(respacing="ddim50").timestep_map.tolist() == list(range(0, T, 20))
    kept = space_timesteps(1000, "250")
    assert kept[-1] == 999 and set(np.diff(kept)) == {4, 5}
    # sections: 300 steps as three of 100, 10, 15 and 20 steps each, from each section's first to its last
    kept = np.array(space_timesteps(300, "10,15,20"))
    for lo, count in ((0, 10), (100, 15), (200, 20)):
        inside = kept[(kept >= lo) & (kept < lo + 100)]
        assert len(inside) == count and inside[0] == lo and inside[-1] == lo + 99


def test_model_sees_original_timesteps_and_callback_counts_steps():
    d = Diffusion(respacing="ddim50")
    model, seen = GaussianOracle(0.0, 1.0, d, 0.0), []
    d.ddim_sample_loop(model, (2, 1, 1, 1, 1), callback=lambda i, n, x: seen.append((i, n, x.shape)))
    assert [c.tolist() for c in model.calls] == [[k, k] for k in range(980, -1, -20)]
    assert seen == [(i, 50, (2, 1, 1, 1, 1)) for i in range(1, 51)]


def test_replace_hook_runs_before_each_model_call():
    d = Diffusion(respacing="10", learn_sigma=False)
    known = torch.full((2, 1, 1, 2, 2), 3.0)

    def replace(x, t):  # paste frame 0, noised to level t, into x_t
        x = x.clone()
        x[:, :1] = d.q_sample(known, t, torch.zeros_like(known))
        return x

    seen = []
    model = lambda x, t: seen.append((x[:, 0].clone(), t[0].item())) or torch.zeros_like(x)
    d.ddim_sample_loop(model, (2, 2, 1, 2, 2), replace=replace)
    assert len(seen) == 10
    for x_frame0, step in seen:
        torch.testing.assert_close(x_frame0, torch.full_like(x_frame0, 3 * math.sqrt(ALPHAS_CUMPROD[step])))


# ---------------------------------------------------------------------------------------------- noise


def test_generators_per_sample():
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    batch = randn((3, 2, 4), gens(), "cpu")
    for b, seed in enumerate((5, 6, 7)):
        assert torch.equal(batch[b : b + 1], torch.randn((1, 2, 4), generator=torch.Generator().manual_seed(seed)))
    with pytest.raises(ValueError, match="generators"):
        randn((2, 2), gens(), "cpu")
    # a sample depends only on its own generator, not on what else is in the batch
    d = Diffusion(respacing="20")
    model = GaussianOracle(0.5, 0.5, d)
    together = d.p_sample_loop(model, (3, 2, 1, 2, 2), generator=gens())
    alone = d.p_sample_loop(model, (1, 2, 1, 2, 2), generator=[torch.Generator().manual_seed(6)])
    assert torch.equal(together[1:2], alone)
    again = d.p_sample_loop(model, (3, 2, 1, 2, 2), generator=gens())
    assert torch.equal(together, again)


# ---------------------------------------------------------------------------------------------- sampling


MU, S = 1.5, 0.5
N = 4000  # standard errors: 0.008 for the mean, 0.006 for the std


def sample_gaussian(d: Diffusion, model, sampler: str, eta: float = 0.0, n: int = N):
    # in float64 (the oracle follows the input's dtype), so that the sampler's error is the only error
    g = torch.Generator().manual_seed(0)
    shape = (n // 4, 2, 2, 1, 1)
    noise = randn(shape, g, "cpu", torch.float64)
    if sampler == "ddpm":
        return d.p_sample_loop(model, shape, noise=noise, generator=g)
    return d.ddim_sample_loop(model, shape, noise=noise, generator=g, eta=eta)


@pytest.mark.parametrize("respacing,learn_sigma", [(None, True), ("250", True), (None, False), ("250", False)])
def test_ddpm_sampling_recovers_gaussian_data(respacing, learn_sigma):
    d = Diffusion(respacing=respacing, learn_sigma=learn_sigma)
    mean, std = mean_std(sample_gaussian(d, GaussianOracle(MU, S, d if learn_sigma else None), "ddpm"))
    assert abs(mean - MU) < 0.03 and abs(std - S) < 0.03, (mean, std)


def test_ddim_sampling_recovers_gaussian_data():
    d = Diffusion(respacing="ddim50")
    mean, std = mean_std(sample_gaussian(d, GaussianOracle(MU, S, d), "ddim"))
    # 50 deterministic steps from t = 980 underestimate s by about 0.03 here (see the next test)
    assert abs(mean - MU) < 0.03 and abs(std - S) < 0.05, (mean, std)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_its_exact_gaussian_moments(eta):
    # With the oracle every DDIM step (DDIM eq. 12) is affine in x_t plus independent noise, so the output's
    # mean and variance follow exactly from a scalar recursion.
    d = Diffusion(respacing="ddim50", learn_sigma=False)
    kept = d.timestep_map.numpy()
    m, var = 0.0, 1.0
    for j in reversed(range(len(kept))):
        a, a_prev = ALPHAS_CUMPROD[kept[j]], ALPHAS_CUMPROD[kept[j - 1]] if j else 1.0
        v_t = a * S**2 + 1 - a
        eps_gain, eps_shift = math.sqrt(1 - a) / v_t, -math.sqrt(1 - a) * math.sqrt(a) * MU / v_t
        x0_gain = (1 - math.sqrt(1 - a) * eps_gain) / math.sqrt(a)
        x0_shift = -math.sqrt(1 - a) * eps_shift / math.sqrt(a)
        sigma2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        gain = math.sqrt(a_prev) * x0_gain + math.sqrt(1 - a_prev - sigma2) * eps_gain
        shift = math.sqrt(a_prev) * x0_shift + math.sqrt(1 - a_prev - sigma2) * eps_shift
        m, var = gain * m + shift, gain**2 * var + sigma2
    mean, std = mean_std(sample_gaussian(d, GaussianOracle(MU, S), "ddim", eta=eta, n=16_000))
    assert abs(mean - m) < 0.01 and abs(std - math.sqrt(var)) < 0.008, (mean, std, m, math.sqrt(var))


def test_sampling_with_constant_variance_values_runs():
    for v in (-1.0, 0.0, 1.0):
        d = Diffusion(respacing="50")
        x = sample_gaussian(d, GaussianOracle(MU, S, d, v), "ddpm")
        mean, std = mean_std(x)
        assert torch.isfinite(x).all() and abs(mean - MU) < 0.05 and 0.3 < std < 0.8


def test_clip_denoised_keeps_predictions_in_range():
    d = Diffusion(respacing="ddim20", learn_sigma=False)
    x = d.ddim_sample_loop(GaussianOracle(MU, S), (500, 1, 1, 1, 1), clip_denoised=True,
                           generator=torch.Generator().manual_seed(0))
    assert x.max() <= 1 + 1e-5 and x.mean() > 0.9  # data at 1.5 +- 0.5 clipped to [-1, 1] ends near 1


# ---------------------------------------------------------------------------------------------- guidance


def test_classifier_free_guidance():
    C = 2

    def model(x, t, y):  # eps and v both depend on the label y (B,)
        y = y.float().view(-1, 1, 1, 1, 1)
        return torch.cat([x * (1 + y) + t.view(-1, 1, 1, 1, 1) / 1000, x * 0 + y / 10], dim=2)

    x = torch.randn(3, 2, C, 4, 4)
    t = torch.tensor([5, 6, 7])
    y, null = torch.tensor([1, 2, 3]), torch.tensor([9, 9, 9])
    cond, uncond = model(x, t, y), model(x, t, null)
    torch.testing.assert_close(classifier_free_guidance(model, 1.0, {"y": null})(x, t, y=y), cond)
    guided0 = classifier_free_guidance(model, 0.0, {"y": null})(x, t, y=y)
    torch.testing.assert_close(guided0[:, :, :C], uncond[:, :, :C])
    torch.testing.assert_close(guided0[:, :, C:], cond[:, :, C:])  # variance channels are not guided
    guided4 = classifier_free_guidance(model, 4.0, {"y": null})(x, t, y=y)
    torch.testing.assert_close(guided4[:, :, :C], uncond[:, :, :C] + 4 * (cond[:, :, :C] - uncond[:, :, :C]))


# ---------------------------------------------------------------------------------------------- training


def test_training_mse_is_minimal_for_the_optimal_predictor():
    d = Diffusion()
    g = torch.Generator().manual_seed(0)
    n = 20_000
    x0 = MU + S * torch.randn(n, 1, 1, 1, 1, generator=g, dtype=torch.float64)
    oracle = GaussianOracle(MU, S, d)
    for step in (10, 300, 900):
        t = torch.full((n,), step)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        terms = d.training_losses(oracle, x0, t, noise=noise)
        a = ALPHAS_CUMPROD[step]
        # the minimum is E[Var(eps | x_t)] = a s^2 / (a s^2 + 1 - a)
        assert terms["mse"].mean().item() == pytest.approx(a * S**2 / (a * S**2 + 1 - a), rel=0.05)
        for perturbed in (lambda o, x: 1.5 * o, lambda o, x: o + 0.1, lambda o, x: o - 0.1 * x):
            worse = d.training_losses(lambda x, t, f=perturbed: f(oracle(x, t), x), x0, t, noise=noise)
            assert worse["mse"].mean() > terms["mse"].mean()
        assert torch.isfinite(terms["vb"]).all() and (terms["vb"] >= 0).all()
        torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
        fixed = Diffusion(learn_sigma=False).training_losses(GaussianOracle(MU, S), x0, t, noise=noise)
        torch.testing.assert_close(fixed["mse"], terms["mse"])
        assert (fixed["vb"] == 0).all() and torch.equal(fixed["loss"], fixed["mse"])


def test_training_vb_is_minimal_for_the_true_reverse_variance():
    # E over x_0, x_t of KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) with the exact mean is smallest when
    # p's variance is Var(x_{t-1} | x_t), which the oracle's v gives.
    d = Diffusion()
    g = torch.Generator().manual_seed(0)
    n, mu, s = 20_000, 0.2, 0.3
    x0 = mu + s * torch.randn(n, 1, 1, 1, 1, generator=g, dtype=torch.float64)
    oracle = GaussianOracle(mu, s, d)
    for step in (0, 1, 10, 100):
        t = torch.full((n,), step)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        vb = d.training_losses(oracle, x0, t, noise=noise)["vb"]
        assert torch.isfinite(vb).all() and (vb >= 0).all()
        if step == 0:  # the decoder likelihood instead: a different quantity, only checked to be sane
            continue
        for dv in (-0.5, -0.2, 0.2, 0.5):
            shifted = lambda x, t, dv=dv: oracle(x, t) + torch.cat([torch.zeros_like(x), torch.full_like(x, dv)], 2)
            assert d.training_losses(shifted, x0, t, noise=noise)["vb"].mean() > vb.mean()


def test_vb_at_t0_is_the_decoder_nll_in_bits():
    # with eps exact the predicted x_0 is x_0, so p(x_0 | x_1) = N(x_0, sigma^2) with sigma^2 interpolated at
    # v = 0.5 between the clipped posterior variance and beta_0; L_0 = -log of its mass on x_0's bin (DDPM eq. 13)
    d = Diffusion()
    x0 = torch.tensor([-1.0, -1 + 2 / 255, 0.2, 1.0], dtype=torch.float64).view(1, 1, 4, 1, 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = lambda x, t: torch.cat([noise, torch.full_like(noise, 0.5)], dim=2)
    vb = d.training_losses(model, x0, torch.zeros(1, dtype=torch.long), noise=noise)["vb"]
    posterior_var_1 = DDPM_BETAS[1] * (1 - ALPHAS_CUMPROD[0]) / (1 - ALPHAS_CUMPROD[1])
    std = math.exp(0.5 * (0.75 * math.log(DDPM_BETAS[0]) + 0.25 * math.log(posterior_var_1)))
    cdf = lambda z: 0.5 * (1 + math.erf(z / (std * math.sqrt(2))))
    nll = [-math.log(cdf(1 / 255)), -math.log(cdf(1 / 255) - cdf(-1 / 255)), -math.log(cdf(1 / 255) - cdf(-1 / 255)),
           -math.log(1 - cdf(-1 / 255))]
    assert vb.item() == pytest.approx(np.mean(nll) / math.log(2), rel=1e-6)


def test_vb_gradient_does_not_reach_the_mean():
    d = Diffusion()
    w_mean, w_var = torch.tensor(0.5, requires_grad=True), torch.tensor(0.1, requires_grad=True)
    model = lambda x, t: torch.cat([w_mean * x, w_var * x], dim=2)
    x0 = torch.randn(4, 2, 3, 4, 4)
    terms = d.training_losses(model, x0, torch.tensor([0, 1, 100, 999]), generator=torch.Generator().manual_seed(0))
    g_mean, g_var = torch.autograd.grad(terms["vb"].sum(), [w_mean, w_var], allow_unused=True, retain_graph=True)
    assert (g_mean is None or g_mean == 0) and g_var != 0
    g_mean, g_var = torch.autograd.grad(terms["mse"].sum(), [w_mean, w_var], allow_unused=True)
    assert g_mean != 0 and (g_var is None or g_var == 0)


def test_frame_mask_counts_only_masked_frames():
    d = Diffusion()
    x0 = torch.randn(3, 4, 2, 3, 3)
    t, noise = torch.tensor([0, 50, 700]), torch.randn(3, 4, 2, 3, 3)
    mask = torch.tensor([[1, 1, 0, 0]] * 3, dtype=torch.bool)

    def model(x, t):  # sensible on the first two frames, garbage on the others
        out = torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=2)
        out[:, 2:] = 1e3
        return out

    masked = d.training_losses(model, x0, t, noise=noise, frame_mask=mask)
    first = d.training_losses(lambda x, t: model(x, t)[:, :2], x0[:, :2], t, noise=noise[:, :2])
    for k in ("loss", "mse", "vb"):
        torch.testing.assert_close(masked[k], first[k])
    assert masked["loss"].shape == (3,)
