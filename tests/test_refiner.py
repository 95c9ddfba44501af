import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from common.core.errors import DataError
from common.core.seeds import case_seed
from common.diffusion.sampling import noise_to
from common.diffusion.schedulers import make_scheduler
from common.images.refiner import (
    VIEWS,
    RandViewSlicesd,
    SDMPrepareBatch,
    SemanticDiffusionUNet,
    ViewSlicesd,
    from_view_slices,
    load_view_models,
    refine_volume,
    start_timestep,
    to_view_slices,
    view_model,
)

K = 3


def _eps(kind: str):
    """A scheduler whose model predicts the noise (what the closed forms below assume)."""
    return make_scheduler(kind, prediction_type="epsilon")


pytestmark = pytest.mark.usefixtures("one_thread")


class ConstantNoise(nn.Module):
    """Stub view model: predicts the same noise value everywhere; records its timesteps."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.value, self.calls = value, []

    def forward(self, x, timesteps, seg=None):
        self.calls.append(timesteps.clone())
        return torch.full_like(x, self.value)


def _net():
    torch.manual_seed(0)
    net = SemanticDiffusionUNet(
        num_classes=K,
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=4,
        spade_intermediate_channels=8,
    )
    for p in net.parameters():  # the output conv starts at zero: make the net non-trivial
        nn.init.normal_(p, std=0.1)
    return net.eval()


def _pair(b=1, shape=(8, 6, 4)):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(b, 1, *shape, generator=g) - 0.5
    labels = torch.randint(0, K, (b, *shape), generator=g)
    return image, nn.functional.one_hot(labels, K).movedim(-1, 1).float()


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 5)] * 4),
    view=st.sampled_from(VIEWS),
    seed=st.integers(0, 2**16),
)
def test_view_slices_invert_exactly(shape, view, seed):
    volume = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    slices = to_view_slices(volume, view)
    axis = {"axial": 3, "coronal": 2, "sagittal": 1}[view]
    assert slices.shape[:2] == (shape[axis], shape[0])
    assert torch.equal(slices[-1], volume.select(axis, shape[axis] - 1))
    assert torch.equal(from_view_slices(slices, view, shape), volume)


def test_view_slices_errors():
    with pytest.raises(ValueError, match="view must be one of"):
        to_view_slices(torch.zeros(1, 2, 3, 4), "oblique")
    with pytest.raises(ValueError, match="must have shape"):
        from_view_slices(torch.zeros(4, 1, 2, 3), "coronal", (1, 2, 3, 4))


def test_slice_transforms():
    data = {"image": torch.rand(1, 8, 6, 4), "label": torch.rand(K, 8, 6, 4), "case": "c0"}
    rand = RandViewSlicesd(["image", "label"], "coronal", num_samples=5)
    rand.set_random_state(0)
    out = rand(data)
    assert len(out) == 5 and out[0]["image"].shape == (1, 8, 4)
    assert out[0]["label"].shape == (K, 8, 4) and out[0]["case"] == "c0"
    every = ViewSlicesd(["image", "label"], "sagittal", stride=3)(data)
    assert [s["image"].shape for s in every] == [(1, 6, 4)] * 3
    assert torch.equal(every[1]["label"], data["label"][:, 3])


def test_network_accepts_literal_timesteps_and_missing_seg():
    net, x = _net(), torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        uncond = net(x, timesteps=5)
        zeros = net(x, timesteps=torch.tensor([5, 5]), seg=torch.zeros(2, K, 8, 8))
        cond = net(x, timesteps=[5], seg=torch.ones(2, K, 8, 8))
    assert torch.equal(uncond, zeros) and not torch.allclose(uncond, cond)


def test_prepare_batch_condition_dropout():
    scheduler = _eps("ddpm")
    image, mask = torch.rand(4000, 1, 4, 4) * 2 - 1, torch.ones(4000, K, 4, 4)
    x_t, target, args, kw = SDMPrepareBatch(scheduler, 0.2, seed=0)({"image": image, "label": mask})
    dropped = (kw["seg"] == 0).flatten(1).all(1)
    assert abs(dropped.float().mean().item() - 0.2) < 0.03
    assert (kw["seg"][~dropped] == 1).all() and args == ()
    ab = scheduler.alphas_cumprod[kw["timesteps"]][:, None, None, None]
    torch.testing.assert_close(x_t, ab.sqrt() * image + (1 - ab).sqrt() * target)
    _, _, _, none = SDMPrepareBatch(scheduler, 0.0, seed=0)({"image": image, "label": mask})
    assert (none["seg"] == 1).all()


def test_prepare_batch_reseeds_for_validation():
    pb = SDMPrepareBatch(_eps("ddpm"), 0.2, seed=3, reseed_every_batch=True)
    batch = {"image": torch.rand(8, 1, 4, 4), "label": torch.ones(8, K, 4, 4)}
    first, second = pb(batch), pb(batch)
    assert torch.equal(first[0], second[0]) and torch.equal(first[3]["seg"], second[3]["seg"])


def test_guidance_in_one_pass_equals_two_calls():
    net, x, t = _net(), torch.rand(3, 1, 8, 8), torch.tensor([10, 4, 0])
    seg = _pair(3, (8, 8, 1))[1][..., 0]
    with torch.no_grad():
        one_pass = view_model(net, seg, 1.5)(x, t)
        cond = net(x, timesteps=t, seg=seg)
        uncond = net(x, timesteps=t, seg=torch.zeros_like(seg))
        two_calls = uncond + 1.5 * (cond - uncond)
    torch.testing.assert_close(one_pass, two_calls, atol=1e-5, rtol=1e-5)


def test_guided_unconditional_input_is_the_trained_condition_dropout():
    """The unconditional half of a guided pass sees what SDMPrepareBatch's dropped samples
    see: the same noisy slice, an all-zero mask of the same shape."""
    scheduler, net, seen = _eps("ddpm"), _net(), []
    net.register_forward_hook(
        lambda module, args, kwargs, out: seen.append((args[0], kwargs["seg"])), with_kwargs=True
    )
    x, seg = torch.rand(3, 1, 8, 8), _pair(3, (8, 8, 1))[1][..., 0]
    image = torch.rand(3, 1, 8, 8) * 2 - 1
    _, _, _, dropped = SDMPrepareBatch(scheduler, 1.0, seed=0)({"image": image, "label": seg})
    with torch.no_grad():
        view_model(net, seg, 1.5)(x, torch.tensor([10, 4, 0]))
    ((inputs, segs),) = seen
    assert all(torch.equal(half, x) for half in inputs.chunk(2))
    cond, uncond = segs.chunk(2)
    assert torch.equal(cond, seg) and torch.equal(uncond, dropped["seg"])


def test_zero_noise_model_returns_the_noised_start_rescaled():
    """DDIM with a model that predicts zero noise: x0 = x_t0 / sqrt(alpha_bar_t0)."""
    scheduler, (image, mask) = _eps("ddim"), _pair()
    out = refine_volume({"axial": ConstantNoise()}, scheduler, image, mask, t0=10, seed=[7])
    x_t0 = noise_to(scheduler, image, 10, torch.Generator().manual_seed(7))
    expected = x_t0 / scheduler.alphas_cumprod[10].sqrt()
    torch.testing.assert_close(out, expected.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_t0_zero_keeps_the_image():
    image, mask = _pair()
    out = refine_volume({"axial": ConstantNoise()}, _eps("ddpm"), image, mask, t0=0)
    assert (out - image).abs().max() < 0.06  # only the noise of step 0, std 0.01


def test_views_are_averaged_from_the_same_start():
    """The update is affine in the predicted noise (no x0 clipping at these values): the mean
    of the views equals one view with the mean prediction."""
    scheduler, (image, mask) = _eps("ddim"), _pair(2)
    views = {v: ConstantNoise(c) for v, c in zip(VIEWS, (0.2, 0.4, 1.2))}
    three = refine_volume(views, scheduler, image, mask, t0=20, steps=100, guidance=1.0)
    one = refine_volume({"coronal": ConstantNoise(0.6)}, scheduler, image, mask, t0=20, steps=100)
    torch.testing.assert_close(three, one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(three, image, atol=1e-2)


@pytest.mark.parametrize("kind,steps,t0,expected", [("ddpm", 1000, 10, 10), ("ddim", 100, 15, 10)])
def test_only_timesteps_up_to_t0_run(kind, steps, t0, expected):
    image, mask = _pair(2)
    models = {v: ConstantNoise() for v in VIEWS}
    scheduler = _eps(kind)
    refine_volume(models, scheduler, image, mask, t0=t0, steps=steps, slice_batch=100)
    assert start_timestep(scheduler, steps, t0) == expected
    for view, model in models.items():
        ts = [int(c[0]) for c in model.calls]
        assert ts == list(range(expected, -1, -(1000 // steps)))  # one call per step, no chunks
        n = 2 * to_view_slices(image[0], view).shape[0]
        assert all(c.shape == (2 * n,) for c in model.calls)  # cond + uncond in one pass


def test_refinement_is_seeded_and_independent_of_batching():
    net, (image, mask) = _net(), _pair(2)
    models = {"coronal": net}  # 6 slices (8 x 4) per volume
    args = dict(scheduler=_eps("ddpm"), t0=1, guidance=1.5, slice_batch=6)
    a = refine_volume(models, image=image, onehot_mask=mask, seed=[1, 2], **args)
    b = refine_volume(
        models, image=image, onehot_mask=mask, seed=[1, 2], **{**args, "slice_batch": 5}
    )
    alone = refine_volume(models, image=image[1:], onehot_mask=mask[1:], seed=[2], **args)
    other = refine_volume(models, image=image[1:], onehot_mask=mask[1:], seed=[3], **args)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone, other)


def test_an_int_seed_gives_volume_b_case_seed():
    image, mask = _pair(2)
    models, scheduler = (
        {"axial": ConstantNoise(), "sagittal": ConstantNoise()},
        _eps("ddpm"),
    )
    default = refine_volume(models, scheduler, image, mask, t0=5, seed=4)
    seeds = [case_seed(4, 0), case_seed(4, 1)]
    torch.testing.assert_close(
        default, refine_volume(models, scheduler, image, mask, 5, seed=seeds)
    )
    assert not torch.allclose(default, refine_volume(models, scheduler, image, mask, 5, seed=3))


def test_refine_errors():
    image, mask = _pair()
    scheduler = _eps("ddpm")
    with pytest.raises(ValueError, match="models must map"):
        refine_volume({"oblique": ConstantNoise()}, scheduler, image, mask)
    with pytest.raises(ValueError, match="onehot_mask"):
        refine_volume({"axial": ConstantNoise()}, scheduler, image, mask[..., :2])
    with pytest.raises(ValueError, match="expects 3 mask channels"):
        refine_volume({"axial": _net()}, scheduler, image, mask[:, :2])
    with pytest.raises(ValueError, match="below every timestep"):
        refine_volume({"axial": ConstantNoise()}, _eps("ddim"), image, mask, -1)


def test_load_view_models(tmp_path):
    net = _net()
    torch.save(net.state_dict(), tmp_path / "refiner_axial.pt")
    models = load_view_models(net, tmp_path, ["axial"])
    assert list(models) == ["axial"] and models["axial"] is not net
    torch.testing.assert_close(models["axial"].state_dict(), net.state_dict())
    with pytest.raises(DataError, match="refiner_coronal.pt"):
        load_view_models(net, tmp_path, ["axial", "coronal"])
