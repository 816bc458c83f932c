"""Every row of docs/bad-input.md, run as written: exit code, a one-line message, nothing half-written."""
import errno
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from shapefirst.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|(.*?)\|\s*`(.*?)`\s*\|(.*?)\|\s*(\d+)\s*\|$")


def rows():
    out = []
    for line in DOC.read_text().splitlines():
        m = ROW.match(line.strip())
        if m:
            out.append(pytest.param(m.group(3), m.group(4).strip(), int(m.group(5)),
                                    id=f"{m.group(1)}-{m.group(2).strip()}"))
    return out


def test_the_table_has_at_least_25_rows():
    assert len(rows()) >= 25


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_folder, tiny_pipe):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from shapefirst.tiny import tiny_sd3_pipeline, tiny_sd_pipeline

    root = tmp_path_factory.mktemp("bad")
    p = {"model": tiny_folder, "missing": root / "missing"}
    (root / "empty_dir").mkdir()
    p["empty_dir"] = root / "empty_dir"
    p["file"] = root / "a_file.txt"
    p["file"].write_text("not a model")
    corrupt = root / "corrupt"
    tiny_pipe.save_pretrained(corrupt, safe_serialization=True)
    next(corrupt.rglob("*.safetensors")).write_bytes(b"garbage")
    p["corrupt"] = corrupt
    pickled = root / "pickled"
    tiny_pipe.save_pretrained(pickled, safe_serialization=False)
    for st in pickled.rglob("*.safetensors"):
        st.unlink()
    torch.save(tiny_pipe.text_encoder.state_dict(), pickled / "text_encoder" / "pytorch_model.bin")
    p["pickled"] = pickled
    ddpm = DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
                                         down_block_types=("DownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "UpBlock2D")), scheduler=DDPMScheduler())
    ddpm.save_pretrained(root / "ddpm")
    p["ddpm"] = root / "ddpm"
    tiny_sd_pipeline(folder=root / "lcm_tok", time_cond_proj_dim=32).save_pretrained(root / "lcm")
    p["lcm"] = root / "lcm"
    tiny_sd3_pipeline(folder=root / "sd3_tok").save_pretrained(root / "sd3")
    p["sd3"] = root / "sd3"
    p["latin1"] = root / "latin1.txt"
    p["latin1"].write_bytes("a red circle\nun café crème rouge\n".encode("latin-1"))
    p["empty_file"] = root / "empty.txt"
    p["empty_file"].write_text("# nothing here\n\n")
    p["bad_pairs"] = root / "pairs.txt"
    p["bad_pairs"].write_text("a red circle || a blue square\nno separator here\n")
    p["long"] = " ".join(["red"] * 100)
    _more_places(p, root, tiny_folder)
    return p


def _more_places(p, root, tiny_folder):
    import json
    import shutil

    from shapefirst.tiny import tiny_sd_pipeline

    os.mkfifo(root / "fifo")
    p["fifo"] = root / "fifo"
    p["prompts"] = root / "prompts.txt"
    p["prompts"].write_text("a red circle\na blue square\n")
    p["user_dir"] = root / "user_dir"
    p["user_dir"].mkdir()
    (p["user_dir"] / "thesis.tex").write_text("precious")
    for name, edit in (("no_unet", lambda d: shutil.rmtree(d / "unet")),
                       ("no_tok", lambda d: [f.unlink() for f in (d / "tokenizer").iterdir()
                                             if f.name != "tokenizer_config.json"]),
                       ("bad_width", lambda d: _edit(d / "unet" / "config.json", cross_attention_dim=48)),
                       ("bad_shape", lambda d: _edit(d / "unet" / "config.json", block_out_channels=[32, 64]))):
        shutil.copytree(tiny_folder, root / name)
        edit(root / name)
        p[name] = root / name
    p["u2028_pairs"] = root / "u2028.txt"
    p["u2028_pairs"].write_text("a red\u2028circle || a blue square\n", encoding="utf-8")
    tiny_sd_pipeline(seed=1, folder=root / "other_tok").save_pretrained(root / "other_model")
    p["other_model"] = root / "other_model"
    for name, argv in (("gen_dir", ["generate", "x", "--model", tiny_folder, "--steps", "2"]),
                       ("sweep_dir", ["sweep", "--model", tiny_folder, "--prompts", p["prompts"],
                                      "--n", "2", "--steps", "2",
                                      "--stops", "0.5", "--schedulers", "ddim", "--timing-batches", "0"]),
                       ("analysis_dir", ["analyze", "frequency", "--model", tiny_folder, "--prompts", p["prompts"],
                                         "--steps", "2", "--n", "2"])):
        p[name] = root / name
        assert main([str(a) for a in argv] + ["--out", str(p[name])]) == 0
    json.dumps({})


def _edit(path, **changes):
    import json

    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("command,message,code", rows())
def test_bad_input_row(places, tmp_path, capsys, monkeypatch, command, message, code):
    out = tmp_path / "out"
    argv = [a.replace("\\x00", "\x00") for a in shlex.split(command.format(out=out, **places))]
    if "disk full" in message or "free disk space" in message:
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, err
    assert message in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len([ln for ln in lines if message in ln]) == 1, err
    if code != 0:
        assert len(lines) == 1, err
        assert lines[0].startswith("error: ")
        assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))
    assert (places["user_dir"] / "thesis.tex").read_text() == "precious"
    assert not list(places["user_dir"].parent.glob("*.tmp"))
