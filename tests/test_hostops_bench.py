"""benchmarks/hostops.py: its count sees the monitor's training-thread entry points once per step on the
training thread, and each counted step's record once on the publisher thread, each thread's code under
its own count. The counts themselves are not asserted (they change with the code)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import hostops  # noqa: E402


def test_the_counts_are_each_threads_monitor_code_per_step():
    c = hostops.count(layers=1, steps=6, warmup=2)
    per = {name.split(" ")[-1]: (ops, calls) for name, ops, calls in c["functions"]}
    for entry in ("_forward_pre", "_forward_post_model", "_optimizer_pre", "_optimizer_post", "_finalize"):
        assert per[entry][1] == 1.0 and per[entry][0] > 0, entry
    assert "decode" not in per and "_publish_batch" not in per  # the publisher's work is in its own count
    assert not any(name.startswith("trainer/") for name, _, _ in c["functions"])
    assert c["opcodes"] == pytest.approx(sum(ops for _, ops, _ in c["functions"])) and c["param_tensors"] == 16
    pub = c["publisher"]
    on_pub = {name.split(" ")[-1]: (ops, calls) for name, ops, calls in pub["functions"]}
    assert on_pub["decode"][1] == 1.0  # each counted step decoded once, the warm-up's not at all
    assert on_pub["encode_step"][1] == 1.0 and on_pub["_publish_batch"][1] <= 1.0
    assert "_finalize" not in on_pub and "_forward_pre" not in on_pub
    assert pub["opcodes"] == pytest.approx(sum(ops for _, ops, _ in pub["functions"]))


def test_versions_measured_alternately_differ_by_the_median_of_their_rounds():
    import hostcost_versions

    def run(hooks, pub):
        return {"direct_us": hooks, "publisher_cpu_us": pub, "probe_us": 0.0, "host_us": hooks + pub}

    # The VM slows down over the rounds; B is always 10 us lighter in the hooks than A beside it.
    drift = [0.0, 40.0, 80.0]
    res = {"rounds": 3, "layers": 12, "steps": 10, "warmup": 5, "date": "d", "notes": {"B": "lighter"},
           "versions": {"A": "abc1234", "B": "def5678+changes"},
           "runs": {"A": [run(100 + d, 50) for d in drift], "B": [run(90 + d, 50) for d in drift]}}
    md = hostcost_versions.render(res)
    row = next(line for line in md.splitlines() if line.startswith("| B |"))
    assert "`def5678+changes` lighter" in row and "| 130 us (90 .. 170) |" in row
    assert "inside the hooks -10 us; publisher CPU +0 us; host us/step -10 us" in row


def test_the_publisher_on_its_own_publishes_nothing_while_the_steps_run():
    import publisher_interference

    from monitor.hooks import publisher

    kept = publisher.GATHER_SECONDS, publisher.MAX_BATCH
    alone = publisher_interference.child(layers=1, steps=12, warmup=4, mode="alone")
    assert (publisher.GATHER_SECONDS, publisher.MAX_BATCH) == kept  # put back for whoever comes next
    beside = publisher_interference.child(layers=1, steps=12, warmup=4, mode="beside")
    # (child() raises if anything was published while the steps ran: all of it comes at the flush)
    assert alone["publisher_us"] > alone["during_us"] >= 0.0
    assert beside["publisher_us"] > 0.0


def test_the_slope_is_the_median_of_each_rounds_difference_per_extra_tensor():
    import hostcost_slope

    def run(tensors, typical, uncommon, pub, canary):
        hooks = typical + uncommon
        return {"param_tensors": tensors, "direct_us": hooks, "direct_typical_us": typical, "uncommon_us": uncommon,
                "publisher_cpu_us": pub, "probe_us": 0.0, "probe_each_us": 0.0, "host_us": hooks + pub,
                "canary_us": canary}

    # The VM slows down over the rounds, both depths alike; the deep model's typical step is 43.2 us
    # heavier (0.1 us per each of its 432 extra tensors) and its uncommon steps 21.6 us (0.05); the
    # canary runs 1.5x as long beside it.
    drift = [0.0, 50.0, 100.0]
    res = {"rounds": 3, "layers": [12, 48], "steps": 10, "warmup": 5, "date": "d", "version": "abc1234",
           "runs": {"12": [run(148, 100 + d, 10, 40, 20) for d in drift],
                    "48": [run(580, 143.2 + d, 31.6, 40, 30) for d in drift]}}
    per = hostcost_slope.slopes(res)
    assert per["direct_typical_us"] == pytest.approx([0.1] * 3)
    assert per["uncommon_us"] == pytest.approx([0.05] * 3) and per["publisher_cpu_us"] == [0.0] * 3
    md = hostcost_slope.render(res)
    last = next(line for line in md.splitlines() if line.startswith("| **per extra tensor**"))
    assert "| 0.100 (0.100 .. 0.100) | 0.050 (0.050 .. 0.050) |" in last
    assert "grows +0.100 us per tensor (within it); everything together +0.150 (over it)" in md
    # ratios per round: 143.2/100, 193.2/150, 243.2/200 for the hooks' typical step
    assert "typical step takes 1.29x (1.22 .. 1.43) as long, the canary 1.50x (1.50 .. 1.50)" in md
    assert "the hooks' ratio over the canary's: 0.86x" in md
