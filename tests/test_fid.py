"""shapefirst.fid: FID through torchmetrics on a user-supplied Inception weights file.

Uses RANDOM Inception weights (nothing is downloaded) and tiny image sets (8 per side, 64x64)."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from shapefirst.errors import ShapefirstError
from shapefirst.metrics import frechet_distance

import shapefirst.fid as fidmod
N = 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path of a .safetensors file with random Inception weights, those weights)."""
    sd = {k: v.clone() for k, v in fidmod.random_inception(seed=0).state_dict().items()}
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file(sd, str(path))
    return path, sd


@pytest.fixture(scope="module")
def model(saved):
    return fidmod.load_inception(saved[0])


def _images(seed, n, lo, hi, size=64):
    """Smooth random colour fields with brightness in [lo, hi]: float [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(lo, hi, size=(n, 8, 8, 3))
    x = np.repeat(np.repeat(coarse, size // 8, axis=1), size // 8, axis=2)
    return np.clip(x + rng.normal(0, 0.03, size=x.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def sets():
    return {"a": _images(1, N, 0.5, 1.0), "b": _images(2, N, 0.5, 1.0), "dark": _images(3, N, 0.0, 0.25)}


@pytest.fixture(scope="module")
def fids(model, sets):
    def run(x, y):
        m = fidmod.Fid(model, batch_size=4)
        m.update(x, real=True)
        m.update(y, real=False)
        return m.compute()

    return {"aa": run(sets["a"], sets["a"]), "ab": run(sets["a"], sets["b"]), "a_dark": run(sets["a"], sets["dark"])}


def test_loaded_weights_equal_saved(model, saved):
    loaded = model.state_dict()
    for k, v in saved[1].items():
        assert torch.equal(loaded[k], v), k
    assert not model.training
    with torch.no_grad():
        out = model((torch.rand(2, 3, 40, 40) * 255).byte())
    assert out.shape == (2, 2048) and out.dtype == torch.float32


def test_fid_self_zero_and_orders_distributions(fids):
    scale = fids["a_dark"]
    assert scale > 0
    assert abs(fids["aa"]) < 1e-3 * scale
    assert fids["a_dark"] > 2 * fids["ab"] > 0


def test_fid_matches_closed_form(model, sets, fids):
    def feats(x):
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        with torch.no_grad():
            return model((t * 255).byte())  # same quantisation as torchmetrics' normalize=True

    def closed_form(x, y):
        # FID is invariant under an orthonormal change of basis, and with n << 2048 both covariances and
        # the mean difference live in span{x - mean x, y - mean y, mean x - mean y} (<= 2n-1 dims).
        # Projecting onto that span is exact and spares scipy's sqrtm a 2048x2048 matrix (~20-60 s).
        x, y = x.double(), y.double()
        span = torch.cat([x - x.mean(0), y - y.mean(0), (x.mean(0) - y.mean(0))[None]])
        q, _ = torch.linalg.qr(span.T)  # [2048, 2n+1], orthonormal columns
        return frechet_distance(x @ q, y @ q)

    fa, fb, fd = feats(sets["a"]), feats(sets["b"]), feats(sets["dark"])
    assert fa.shape == (N, 2048)
    for got, want in ((fids["ab"], closed_form(fa, fb)), (fids["a_dark"], closed_form(fa, fd))):
        assert got == pytest.approx(want, rel=1e-3)


def test_fid_function_and_n_check(saved, sets):
    with pytest.raises(ShapefirstError, match="at least 2 images per side"):
        fidmod.fid(sets["a"][:1], sets["b"], saved[0])
    x = sets["a"][:2]
    bad = x * 2.0
    with pytest.raises(ShapefirstError, match=r"not \[0, 1\]"):
        fidmod.fid(x, bad, saved[0])
    m = fidmod.Fid(saved[0])
    m.update(x, real=True)
    with pytest.raises(ShapefirstError, match="0 fake"):
        m.compute()


def test_pickle_refused_unless_allowed(saved, tmp_path):
    pth = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(saved[1], pth)
    with pytest.raises(ShapefirstError, match="pickle") as e:
        fidmod.load_inception(pth)
    assert "allow_pickle=True" in str(e.value) and "safetensors" in str(e.value)
    m = fidmod.load_inception(pth, allow_pickle=True)
    assert torch.equal(m.state_dict()["fc.weight"], saved[1]["fc.weight"])
    disguised = tmp_path / "really_a_pickle.safetensors"  # torch.save content under a safetensors name
    disguised.write_bytes(pth.read_bytes())
    with pytest.raises(ShapefirstError, match="pickle"):
        fidmod.load_inception(disguised)
    legacy = tmp_path / "legacy_pickle.safetensors"  # pre-zip torch.save format: a raw pickle stream
    torch.save({"fc.bias": saved[1]["fc.bias"]}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ShapefirstError, match="pickle"):
        fidmod.load_inception(legacy)


def test_bad_files(saved, tmp_path):
    with pytest.raises(ShapefirstError, match="does not exist") as e:
        fidmod.load_inception(tmp_path / "nope.safetensors")
    assert fidmod.WEIGHTS_URL_NAME in str(e.value)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(ShapefirstError, match="not the FID Inception v3 state dict") as e:
        fidmod.load_inception(wrong)
    assert "Conv2d_1a_3x3.conv.weight" in str(e.value)
    shape = tmp_path / "shape.safetensors"
    save_file({**saved[1], "fc.weight": torch.zeros(1000, 2048)}, str(shape))
    with pytest.raises(ShapefirstError, match="wrong shape"):
        fidmod.load_inception(shape)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ShapefirstError, match="not a readable safetensors file"):
        fidmod.load_inception(junk)


def test_prefixed_and_counterless_state_dict_accepted(saved, tmp_path):
    sd = {f"inception.{k}": v for k, v in saved[1].items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "prefixed.safetensors"
    save_file(sd, str(path))
    m = fidmod.load_inception(path)
    assert torch.equal(m.state_dict()["Mixed_7c.branch_pool.conv.weight"],
                       saved[1]["Mixed_7c.branch_pool.conv.weight"])


def test_sweep_reports_fid_per_configuration(tiny_pipe, tmp_path, model):
    """The sweep's FID (real features kept, generated ones reset per configuration) equals a direct FID
    of the same generated images."""
    from shapefirst.sweep import Config, run_sweep
    from shapefirst.generate import generate
    from shapefirst.guidance import GuidanceSchedule

    prompts = ["a red circle", "a blue square", "a green cross", "a yellow triangle"]
    real = _images(5, 6, 0.2, 0.9)
    meter = fidmod.Fid(model)
    meter.update(real, real=True)
    cfgs = [Config("full", GuidanceSchedule(7.5), "ddim", 3),
            Config("stop", GuidanceSchedule(7.5, stop=0.5), "ddim", 3)]
    rows = run_sweep(tiny_pipe, prompts, tmp_path, configs=cfgs, batch=2, timing_batches=0, fid=meter)
    for cfg, row in zip(cfgs, rows):
        imgs = np.concatenate([generate(tiny_pipe, prompts[i:i + 2], cfg.schedule, steps=3, seed=i).images
                               for i in (0, 2)])
        assert row["fid_n"] == [6, 4]
        assert row["fid"] == pytest.approx(fidmod.fid(real, imgs, model), rel=1e-4)
    assert rows[0]["fid"] != rows[1]["fid"]


def test_image_folder_reader(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    x = fidmod.read_image_folder(tmp_path, size=16)
    assert x.shape == (3, 16, 16, 3) and np.allclose(x[2], 80 / 255)
    with pytest.raises(ShapefirstError, match="at least 2"):
        fidmod.read_image_folder(_one(tmp_path))


def _one(tmp_path):
    d = tmp_path / "one"
    d.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "a.png")
    return d


def test_the_torch_fidelity_shim_is_the_real_package_and_nothing_else():
    """The one shim (fid._import_fidelity_inception): where `import torch_fidelity` fails (torchvision
    missing), the real package is registered from its own spec without its __init__; the Inception is
    torch-fidelity's class, reached through torchmetrics' public NoTrainInceptionV3."""
    import importlib.util
    import sys

    tm_fid = fidmod._torchmetrics_fid()
    spec = importlib.util.find_spec("torch_fidelity.feature_extractor_inceptionv3")
    pkg = sys.modules["torch_fidelity"]
    assert list(pkg.__path__) == list(importlib.util.find_spec("torch_fidelity").submodule_search_locations)
    base = sys.modules["torch_fidelity.feature_extractor_inceptionv3"].FeatureExtractorInceptionV3
    assert spec.origin.endswith("feature_extractor_inceptionv3.py")
    assert issubclass(fidmod._inception_class(), tm_fid.NoTrainInceptionV3)
    assert issubclass(tm_fid.NoTrainInceptionV3, base)
