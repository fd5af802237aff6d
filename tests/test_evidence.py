"""The study runner (benchmarks/study.py) and docs/evidence.md's generator (benchmarks/evidence.py).

The generator's table is checked against a small results JSON whose figures were
worked out by hand (medians, t-based intervals with t(1) = 12.706, the frontier
interpolated per seed), not with the code under test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import evidence  # noqa: E402
import study  # noqa: E402

MIB = 2**20
CONFIG = {
    "task": "digits", "model": "resnet20", "epochs": 5, "batch_size": 128, "steps_per_epoch": 12,
    "total_steps": 60, "budgets": [0.5, 1.0], "seeds": [0, 1], "interval": "epoch", "lr": 0.1,
    "optimizer": "SGD", "device": "cpu", "precision": "fp32", "threads": 2, "quick": False,
    "data": {"name": "digits", "train_size": 1437, "test_size": 360},
    "variants": [{"name": n, "description": ""} for n in ("none", "composer", "start0.1", "flops", "cache")],
}
ENVIRONMENT = {"python": "3.11.7", "torch": "2.13.0+cpu", "layerfreeze": "0.1.0", "platform": "Linux",
               "processor": "x86_64", "cpu": "AMD EPYC", "cpu_count": 2, "threads": 2, "device": "cpu",
               "gpu": None, "cuda": None}
# (variant, seed, budget, seconds, accuracy): the baseline's frontier is (10 s, 80%) - (20 s, 90%) for seed 0
# and (12 s, 82%) - (22 s, 92%) for seed 1.
RUNS = [
    ("none", 0, 1.0, 20.0, 0.90), ("none", 0, 0.5, 10.0, 0.80),
    ("composer", 0, 1.0, 15.0, 0.88),   # frontier at 15 s: 85%  -> +3 pt
    ("start0.1", 0, 1.0, 14.0, 0.90),   # frontier at 14 s: 84%  -> +6 pt
    ("flops", 0, 1.0, 18.0, 0.80),      # frontier at 18 s: 88%  -> -8 pt
    ("cache", 0, 1.0, 8.0, 0.85),       # faster than the 0.5 budget: outside
    ("none", 1, 1.0, 22.0, 0.92), ("none", 1, 0.5, 12.0, 0.82),
    ("composer", 1, 1.0, 17.0, 0.86),   # frontier at 17 s: 87%  -> -1 pt
    ("start0.1", 1, 1.0, 16.0, 0.92),   # frontier at 16 s: 86%  -> +6 pt
    ("flops", 1, 1.0, 20.0, 0.82),      # frontier at 20 s: 90%  -> -8 pt
    ("cache", 1, 1.0, 9.0, 0.87),
]
PLAN = evidence.Plan(("none", "composer", "start0.1", "flops", "cache"), 2, (0.5, 1.0))


def _run(variant, seed, budget, seconds, accuracy, cpu_share=1.0):
    frozen = variant != "none"
    return {"variant": variant, "seed": seed, "train_seconds": seconds,
            "train_cpu_seconds": seconds * 2 * cpu_share, "eval_seconds": 0.1, "test_accuracy": accuracy,
            "final_train_loss": 0.1, "epoch_train_loss": [0.1], "epoch_seconds": [seconds], "steps": 60,
            "layers": 20, "frozen_depth_end": 10 if frozen else 0, "frozen_layer_share_end": 0.5 if frozen else 0.0,
            "frozen_flops_share_end": 0.4 if frozen else 0.0, "params_frozen_end": 5 if frozen else 0,
            "depth_changes": [[1, 0]], "predicted_speedup": 1.0, "budget": budget,
            "peak_memory_bytes": 100 * MIB, "cache_hits": None, "cache_misses": None}


def _document(runs=RUNS, cpu_share=1.0, device="cpu"):
    return {"format": "layerfreeze-bench/2", "created": "2026-11-30T12:00:00+00:00", "interrupted": False,
            "command": ["layerfreeze", "bench", "--task", "digits", "--output-dir", "docs/evidence/digits"],
            "config": {**CONFIG, "device": device}, "environment": {**ENVIRONMENT, "device": device},
            "runs": [_run(*r, cpu_share=cpu_share) for r in runs], "summary": [], "frontier": []}


EXPECTED_TABLE = [
    "| variant | runs | median time | speedup | CPU-time speedup | test accuracy (95% CI) "
    "| vs baseline at equal time (95% CI) | verdict | frozen at end (layers / FLOPs) | peak memory |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    "| none at budget 0.5 | 2 | 11.0 s | 1.91x |  | 81.0% ± 12.7 |  | (frontier) |  |  |",
    "| none | 2 | 21.0 s | 1.00x | 1.00x | 91.0% ± 12.7 | - | (the baseline) | 0% / 0% | 100 MiB |",
    "| composer | 2 | 16.0 s | 1.31x | 1.31x | 87.0% ± 12.7 | +1.0 pt ± 25.4 | no difference detected "
    "| 50% / 40% | 100 MiB |",
    "| start0.1 | 2 | 15.0 s | 1.40x | 1.40x | 91.0% ± 12.7 | +6.0 pt ± 0.0 | ahead | 50% / 40% | 100 MiB |",
    "| flops | 2 | 19.0 s | 1.11x | 1.11x | 81.0% ± 12.7 | -8.0 pt ± 0.0 | behind | 50% / 40% | 100 MiB |",
    "| cache | 2 | 8.50 s | 2.47x | 2.47x | 86.0% ± 12.7 | - | outside the frontier: faster than the smallest "
    "budget (0.5) in 2 of 2 runs | 50% / 40% | 100 MiB |",
]


def test_table_is_recomputed_from_the_runs_not_the_stored_summary():
    summary, frontier = evidence.summarize(_document())
    assert evidence.table_lines(summary, frontier) == EXPECTED_TABLE


def test_conclusion_says_only_what_the_verdicts_say():
    summary, _ = evidence.summarize(_document())
    assert evidence.conclusion(summary) == [
        "Freezing paid on this task: start0.1 (1.40x, +6.0 pt ± 0.0) reached a higher test accuracy than the "
        "baseline trained for the same time (95% interval of the difference above 0).",
        "Behind the baseline at equal time: flops (1.11x, -8.0 pt ± 0.0); training without freezing for that "
        "time would have given a higher accuracy.",
        "No difference detected for composer (1.31x, +1.0 pt ± 25.4): their 95% intervals hold 0 (the widest "
        "± 25.4 points), so any gain or loss is smaller than these runs can resolve.",
        "Outside the frontier for cache: some runs took less time than the smallest budget or more than the "
        "full one, where the comparison says nothing.",
    ]


def test_conclusion_without_a_variant_ahead_says_freezing_did_not_pay():
    runs = [r for r in RUNS if r[0] in ("none", "composer", "flops")]
    summary, _ = evidence.summarize(_document(runs))
    lines = evidence.conclusion(summary)
    assert lines[0] == ("Freezing did not pay on this task: none of the 2 freezing variants beat the baseline "
                        "trained for the same time.")
    assert lines[1].startswith("Behind the baseline at equal time: flops (1.11x, -8.0 pt ± 0.0)")
    assert lines[2].startswith("No difference detected for composer (1.31x, +1.0 pt ± 25.4)")
    assert len(lines) == 3


def test_a_lead_over_a_bending_frontier_carries_the_interpolation_caveat():
    # seed 0's frontier: (6 s, 60%), (10 s, 80%), (20 s, 90%): 5 then 1 point a second, bending down.
    runs = [("none", 0, 1.0, 20.0, 0.90), ("none", 0, 0.75, 10.0, 0.80), ("none", 0, 0.5, 6.0, 0.60),
            ("start0.1", 0, 1.0, 14.0, 0.90)]
    summary, frontier = evidence.summarize(_document(runs))
    assert evidence.concave(frontier) and summary[1]["verdict"] == "no difference detected"  # one seed
    ahead = [{**summary[1], "verdict": "ahead"}]
    assert evidence.conclusion(ahead, frontier)[1].startswith("A caveat: the frontier joins the baseline's budgets")
    assert len(evidence.conclusion(ahead, frontier[1:])) == 1  # two budgets: no bend to judge
    straight = [{**f, "accuracy_mean": a} for f, a in zip(frontier, (0.60, 0.70, 0.95))]  # 2.5 then 2.5/s
    assert not evidence.concave(straight)
    assert len(evidence.conclusion(ahead, straight)) == 1


def test_complete_section_has_table_conclusion_command_and_machine():
    text = "\n".join(evidence.section("digits", _document(), PLAN, plot="evidence/digits/pareto.png"))
    assert "\n".join(EXPECTED_TABLE) in text
    assert "**Conclusion.** Freezing paid on this task: start0.1" in text
    assert "Incomplete" not in text and "Not yet run" not in text
    assert ("Command: `python benchmarks/study.py --task digits`, which runs "
            "`layerfreeze bench --task digits --output-dir docs/evidence/digits`.") in text
    assert "Machine: CPU: AMD EPYC, 2 logical CPUs, 2 torch thread(s); torch 2.13.0+cpu" in text
    assert "![digits: test accuracy against training time, every run a point](evidence/digits/pareto.png)" in text
    assert "held the CPUs" not in text


def test_missing_json_is_marked_not_yet_run_without_numbers():
    text = "\n".join(evidence.section("fashion-mnist", None, PLAN))
    assert text.startswith("## fashion-mnist\n\n**Not yet run.**")
    assert "Command: `python benchmarks/study.py --task fashion-mnist`" in text
    assert "|" not in text and "Conclusion" not in text and " pt" not in text


def test_incomplete_study_names_what_is_missing_and_draws_no_conclusion():
    runs = [r for r in RUNS if r[0] != "cache" and (r[0], r[1]) != ("flops", 1)]
    text = "\n".join(evidence.section("digits", _document(runs), PLAN))
    assert ("**Incomplete: 9 of 12 runs done** (seeds complete: none; not run at all: cache). Continue with "
            "`python benchmarks/study.py --task digits` (it resumes).") in text
    assert "**Conclusion:** none yet (the study is incomplete)." in text
    assert "Freezing paid" not in text and "did not pay" not in text
    # The finished runs' figures are still shown, as partial: flops has one run, so no interval.
    assert "| flops | 1 | 18.0 s | 1.17x | 1.17x | 80.0% (1 run) | -8.0 pt | no difference detected |" in text


def test_missing_run_of_one_seed_keeps_the_other_seed_complete():
    runs = [r for r in RUNS if (r[0], r[1]) != ("composer", 1)]
    assert evidence.missing_runs([evidence.RunRecord.from_json(_run(*r)) for r in runs], PLAN) == [
        ("composer", 1, 1.0)]
    text = "\n".join(evidence.section("digits", _document(runs), PLAN))
    assert "**Incomplete: 11 of 12 runs done** (seeds complete: 0)." in text


def test_busy_machine_is_noted_from_cpu_time():
    text = "\n".join(evidence.section("digits", _document(cpu_share=0.25), PLAN))
    assert ("12 of 12 runs ran while other work held the CPUs (none seed 0, none seed 0 budget 0.5, composer "
            "seed 0, start0.1 seed 0, flops seed 0, cache seed 0, ...): their processes used a median 25% of their "
            "2 threads' capacity") in text
    assert evidence.busy_note([], 2, "cpu") is None
    records = [evidence.RunRecord.from_json(_run(*r, cpu_share=0.25)) for r in RUNS]
    assert evidence.busy_note(records, 2, "cuda") is None


def test_gpu_results_get_their_own_section_never_the_cpu_one(tmp_path):
    folder = tmp_path / "evidence" / "gpu" / "digits"
    folder.mkdir(parents=True)
    (folder / "bench.json").write_text(json.dumps(_document(device="cuda")), encoding="utf-8")
    text = evidence.build(tmp_path / "evidence", tmp_path, plots=False)
    cpu, gpu = text.split("\n## GPU\n")
    assert "\n## CPU\n" in cpu
    assert "### digits\n\n**Not yet run.**" in cpu and "| start0.1 |" not in cpu
    assert "### digits (GPU)\n\n" in gpu and "| start0.1 | 2 | 15.0 s | 1.40x |" in gpu
    assert "Command: `python benchmarks/study.py --task digits --device cuda`" in gpu
    for task in ("fashion-mnist", "rotten-tomatoes"):
        assert f"### {task}\n\n**Not yet run.**" in cpu
        assert f"### {task} (GPU)\n\n**Not yet run.**" in gpu


def test_committed_evidence_page_is_up_to_date():
    assert evidence.main(["--check"]) == 0


# -- the runner --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("part", "parts", "seeds"), [(1, 1, 5), (1, 2, 3), (2, 2, 5), (1, 5, 1), (3, 5, 3),
                                                     (1, 3, 2), (2, 3, 4), (3, 3, 5)])
def test_parts_are_cumulative_seed_counts(part, parts, seeds):
    assert study.seeds_for_part(part, parts) == seeds


@pytest.mark.parametrize("text", ["0/5", "6/5", "1", "a/b", "1/2/3"])
def test_bad_part_is_refused(text):
    with pytest.raises(ValueError, match=rf"--part .*got '{text}'"):
        study.parse_part(text)


def test_bench_command_of_a_study():
    settings = study.STUDIES["rotten-tomatoes"]
    assert study.bench_argv(settings, device="cuda", seeds=3, threads=2, variants=["none", "composer"],
                            out="docs/evidence/gpu/rotten-tomatoes") == [
        "bench", "--task", "rotten-tomatoes", "--seeds", "3", "--budgets", "0.25,0.5,0.75,1",
        "--variants", "none,composer", "--device", "cuda", "--threads", "2",
        "--output-dir", "docs/evidence/gpu/rotten-tomatoes", "--resume", "--train-size", "1024",
        "--test-size", "1000", "--no-progress"]


def test_fine_tuning_slot_holds_issue_11s_setting(capsys):
    assert study.fine_tuning_registered()
    assert study.main(["--task", "rotten-tomatoes", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert ",convergence,fixed0.7-cache,fixed0.7-cache-lr2 --device cpu " in err and "note:" not in err
    assert study.main(["--task", "digits", "--dry-run"]) == 0
    assert "fixed0.7-cache" not in capsys.readouterr().err


def test_gpu_results_go_to_their_own_folder():
    assert study.output_dir("digits", "cpu", "docs/evidence") == "docs/evidence/digits"
    assert study.output_dir("digits", "cuda", "docs/evidence") == "docs/evidence/gpu/digits"


def test_study_variants_hold_every_policy_and_the_fine_tuning_slot():
    assert study.study_variants(study.STUDIES["digits"], True) == [
        "none", "composer", "start0.1", "flops", "cache", "freezeout", "gradient", "convergence"]
    assert study.study_variants(study.STUDIES["rotten-tomatoes"], False)[-1] == "convergence"
    assert study.study_variants(study.STUDIES["rotten-tomatoes"], True)[-2:] == [
        "fixed0.7-cache", "fixed0.7-cache-lr2"] == list(study.FINE_TUNING_VARIANTS)
    assert study.STUDIES["rotten-tomatoes"].budgets == (0.25, 0.5, 0.75, 1.0)
    assert all(s.budgets == (0.5, 0.75, 1.0) for t, s in study.STUDIES.items() if t != "rotten-tomatoes")


def test_dry_run_prints_the_command_and_runs_nothing(tmp_path, capsys):
    assert study.main(["--task", "digits", "--part", "2/5", "--dry-run", "--output-root", str(tmp_path)]) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        "layerfreeze bench --task digits --seeds 2 --budgets 0.5,0.75,1 --variants "
        "none,composer,start0.1,flops,cache,freezeout,gradient,convergence --device cpu --threads 2 "
        f"--output-dir {tmp_path / 'digits'} --resume --no-progress")
    assert list(tmp_path.iterdir()) == []


def test_more_seeds_split_in_parts(tmp_path, capsys):
    assert study.main(["--task", "fashion-mnist", "--seeds", "8", "--part", "1/2", "--dry-run",
                       "--output-root", str(tmp_path)]) == 0
    assert " --seeds 4 " in capsys.readouterr().err.splitlines()[0]
    with pytest.raises(SystemExit):
        study.main(["--task", "digits", "--seeds", "0", "--dry-run"])
    assert "--seeds must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_study_without_a_gpu_fails_before_writing_anything(tmp_path, capsys):
    assert study.main(["--task", "digits", "--device", "cuda", "--output-root", str(tmp_path)]) == 2
    assert "--device cuda" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_runner_refuses_a_bad_part(capsys):
    with pytest.raises(SystemExit):
        study.main(["--task", "digits", "--part", "6/5", "--dry-run"])
    assert "--part K/M needs 1 <= K <= M, got '6/5'" in capsys.readouterr().err


def test_variant_list_names_each_variant_and_its_learning_rate_multiple():
    lines = evidence.variant_lines([
        {"name": "none", "description": "no freezing.", "lr_scale": 1.0},
        {"name": "fast", "description": "freeze most layers", "lr_scale": 2.0},
        {"name": "bare", "description": ""},  # nothing to say: left out
    ])
    assert lines == ["Variants:", "", "- `none`: no freezing.",
                     "- `fast`: freeze most layers. Trains at 2x the task's learning rate.", ""]
    assert evidence.variant_lines([{"name": "bare", "description": ""}]) == []
    assert evidence.variant_lines([{"name": "x", "description": "", "lr_scale": 0.5}]) == [
        "Variants:", "", "- `x`: Trains at 0.5x the task's learning rate.", ""]


def test_method_card_block_reports_complete_studies_and_names_pending_ones(monkeypatch):
    monkeypatch.setattr(evidence, "study_plan", lambda task: PLAN)
    documents = {("digits", "cpu"): _document(), ("fashion-mnist", "cpu"): None,
                 ("rotten-tomatoes", "cpu"): _document(RUNS[:-1]), ("digits", "cuda"): None}
    assert evidence.card_block(("start0.1", "cache", "fixed"), documents) == [
        evidence.CARD_BEGIN, "",
        "| task | variant | speedup (wall) | test accuracy (95% CI) | baseline's accuracy "
        "| vs baseline at equal time (95% CI) | verdict |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        "| digits | start0.1 | 1.40x | 91.0% ± 12.7 | 91.0% ± 12.7 | +6.0 pt ± 0.0 | ahead |",
        "| digits | cache | 2.47x | 86.0% ± 12.7 | 91.0% ± 12.7 | - | outside the frontier: faster than the "
        "smallest budget (0.5) in 2 of 2 runs |",
        "",
        "Pending: fashion-mnist (not yet run), rotten-tomatoes (incomplete).", "",
        evidence.CARD_END]
    # A GPU study nobody ran is not pending; a method no study runs has no rows.
    assert evidence.card_block(("other",), {("digits", "cuda"): None}) == [
        evidence.CARD_BEGIN, "", "No study that runs this method is complete yet.", "", evidence.CARD_END]


def test_card_block_replaces_only_the_marked_lines():
    begin, end = evidence.CARD_BEGIN, evidence.CARD_END
    card = f"# Card\n\nprose\n\n{begin}\n\nold table\n\n{end}\n\n## Next\n"
    assert evidence.with_card_block(card, [begin, "new", end], "card.md") == (
        f"# Card\n\nprose\n\n{begin}\nnew\n{end}\n\n## Next\n")
    with pytest.raises(ValueError, match="card.md: no study block; put the lines"):
        evidence.with_card_block("# Card without markers\n", [begin, end], "card.md")
