"""Finding sentences follow the numbers: fed results where the finding goes one way, then the other,
the report and `shapefirst analyze` say what the data say."""
from shapefirst.experiments import attention as attention_analysis
from shapefirst.experiments import eos_swap as eos_analysis
from shapefirst.experiments import frequency as frequency_analysis
from shapefirst.experiments import stages as stages_analysis
from shapefirst.report.page import _sections
from shapefirst.results import Result


def attention(sos, eos_pad):
    return {"summary": {"mean_mass_per_class": {"sos": sos, "semantic": 0.05, "eos": 0.02,
                                                "eos_pad": eos_pad, "pad": 0.0},
                        "semantic_f1_ge_0.9_from_call": 3}}


def frequency(low, high):
    return {"reverse": {"settle_median": {"latent": {"low": low, "high": high}, "pixel": {"low": low, "high": high}}}}


def eos(b_shape, a_shape, b_color, a_color):
    return {"rule": "r", "scores": {"swap": {"shape": {"a": {"rate": a_shape, "ci": [0, 1], "n": 8},
                                                      "b": {"rate": b_shape, "ci": [0, 1], "n": 8}},
                                            "color": {"a": {"rate": a_color, "ci": [0, 1], "n": 8},
                                                      "b": {"rate": b_color, "ci": [0, 1], "n": 8}}}}}


def stages(texture, shape):
    settle = {"shape": {"median": shape}, "color": {"median": 2}, "texture": {"median": texture}}
    return {"schedules": {"full": {"settle": settle, "n_calls": 20}}}


def test_attention_sink_is_the_class_with_the_most_mass():
    assert ("[EOS] padding tokens are the attention sink here (0.86"
            in attention_analysis.findings(attention(0.007, 0.859))[0])
    assert "the paper reports [SOS]" in attention_analysis.findings(attention(0.007, 0.859))[0]
    assert attention_analysis.findings(attention(0.7, 0.2))[0].startswith("[SOS] is the attention sink here (0.70")


def test_frequency_order_follows_the_settling_calls():
    assert "low frequencies first, as the paper reports" in frequency_analysis.findings(frequency(3, 12))[0]
    assert "against the paper" in frequency_analysis.findings(frequency(12, 3))[0]
    assert frequency_analysis.title(frequency(3, 12)).startswith("Low frequencies survive")
    assert "which is generated first" in frequency_analysis.title(frequency(12, 3))


def test_eos_swap_says_which_prompt_the_image_follows():
    assert "follows B's [EOS] in every judged attribute" in eos_analysis.findings(eos(0.9, 0.1, 0.8, 0.2))[0]
    assert ("follows A's words in every judged attribute, against the paper"
            in eos_analysis.findings(eos(0.1, 0.9, 0.2, 0.8))[0])
    assert eos_analysis.title(eos(0.9, 0.1, 0.8, 0.2)) == "[EOS] decides the object"
    assert eos_analysis.title(eos(0.1, 0.9, 0.2, 0.8)).startswith("The words, not [EOS]")


def test_stages_texture_order():
    assert "as the paper reports" in stages_analysis.findings(stages(texture=15, shape=4))[0]
    assert ("texture is not the last to settle here, against the paper"
            in stages_analysis.findings(stages(texture=1, shape=4))[0])


def test_report_captions_are_computed_from_the_saved_results(tmp_path):
    res = tmp_path / "results"
    Result("attention", attention(0.007, 0.859)).save(res / "attention")
    Result("frequency", frequency(12, 3)).save(res / "frequency")
    text = " ".join(s["title"] + " " + s["caption"] for s in _sections(res))
    assert "[EOS] padding tokens are the attention sink here" in text
    assert "[SOS] is an attention sink" not in text and "[SOS] is the attention sink" not in text
    assert "Low frequencies survive" not in text and "against the paper" in text
    Result("attention", attention(0.7, 0.1)).save(res / "attention")
    assert "[SOS] is the attention sink here" in " ".join(s["caption"] for s in _sections(res))


def test_every_analysis_module_declares_itself_to_the_registry():
    from shapefirst.experiments import ANALYSES, analyses
    from shapefirst.experiments.registry import Analysis

    assert ANALYSES == ("stages", "frequency", "attention", "eos-swap", "token-ablation")
    for a in analyses().values():
        assert isinstance(a, Analysis) and callable(a.run) and callable(a.summary) and callable(a.plot)


def test_analyze_prints_the_finding(tiny_folder, tmp_path, capsys):
    from shapefirst.cli import main

    pf = tmp_path / "p.txt"
    pf.write_text("a red circle\na blue square\n")
    assert main(["analyze", "attention", "--model", str(tiny_folder), "--prompts", str(pf), "--steps", "3", "--n", "2",
                 "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("finding: ")]
    assert len(line) == 1 and "attention sink here" in line[0]
