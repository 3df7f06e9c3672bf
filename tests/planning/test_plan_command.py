"""``lightning-compress plan``: a real checkpoint, real validation images, a real onnxruntime measurement."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_compress.cli import main
from tests.test_cli import write_image_folder
from tests.test_commands import write_checkpoint


@pytest.fixture()
def checkpoint_and_data(tmp_path):
    write_image_folder(tmp_path / "tree", classes=10, per_class=3)
    return write_checkpoint(tmp_path, num_classes=10), ["--data-root", str(tmp_path / "tree"), "--cache-dir",
                                                         str(tmp_path / "cache"), "--val-size", "8", "--batch-size", "8"]


@pytest.mark.slow
def test_plan_prints_and_writes_a_plan_checked_end_to_end(checkpoint_and_data, tmp_path, capsys):
    checkpoint, data = checkpoint_and_data
    out = tmp_path / "plan.json"
    # widths in steps of 16 (a small latency table): the narrowest network is then about half the dense one's
    # latency, so the target leaves a margin for a busy machine's noise
    main(["plan", str(checkpoint), "--latency-ratio", "0.75", "--table", str(tmp_path / "table.json"),
          "--repeats", "20", "--round-to", "16", "--out", str(out), *data])
    printed = capsys.readouterr().out
    assert "| layer3.0.conv1 | 64 |" in printed and "measured" in printed and "held-out top-1 on 8 images" in printed
    result = json.loads(out.read_text())
    assert result["plan"]["target"] == {"kind": "latency_ratio", "value": 0.75}
    checks = result["plan"]["details"]["checks"]
    grown = len(checks) > 1 and checks[1]["budget"] > checks[0]["budget"]  # over-predicted: re-planned wider
    assert result["plan"]["predicted"] <= (checks[1]["budget"] if grown else 0.75)
    assert result["measured_ms"]["planned"] > 0
    assert all(width % 16 == 0 for width in result["plan"]["widths"].values())


def test_macs_plan_needs_no_runtime(checkpoint_and_data, tmp_path, capsys):
    checkpoint, data = checkpoint_and_data
    main(["plan", str(checkpoint), "--macs-ratio", "0.5", "--out", str(tmp_path / "plan.json"), *data])
    result = json.loads((tmp_path / "plan.json").read_text())
    assert result["plan"]["predicted"] <= 0.5 and "measured_ms" not in result
    assert "latency on" not in capsys.readouterr().out


def test_factorize_plans_tucker2_ranks_and_builds_them(checkpoint_and_data, tmp_path, capsys):
    """At a MACs target well below what the widths alone keep cheaply, ranks are planned beside them; the network
    the command builds (and scores) has the planned MACs."""
    from lightning_compress.commands.checkpoint import load_checkpoint
    from lightning_compress.core.accounting import count_macs
    from lightning_compress.planning.ranks import planned_copy

    checkpoint, data = checkpoint_and_data
    main(["plan", str(checkpoint), "--macs-ratio", "0.3", "--factorize", "--out", str(tmp_path / "plan.json"), *data])
    plan = json.loads((tmp_path / "plan.json").read_text())["plan"]
    assert plan["ranks"] and plan["predicted"] <= 0.3 and plan["details"]["factorize"]
    assert "| factorized layer (Tucker-2) | rank |" in capsys.readouterr().out
    network = load_checkpoint(checkpoint).network.eval()
    example = torch.randn(1, 3, 32, 32)
    built = planned_copy(network, example, plan["widths"], plan["ranks"])
    assert count_macs(built, example) / count_macs(network, example) == pytest.approx(plan["predicted"], rel=1e-3)


@pytest.mark.parametrize("arguments, message", [
    (["--latency-ratio", "2"], "latency_ratio must be in (0, 1), got 2.0"),
    (["--macs-ratio", "0.01"], "macs_ratio=0.01 cannot be reached"),
    (["--latency-ms", "1", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["--latency-ratio", "0.5", "--runtime", "executorch", "--engine", "onnxruntime_7bit"],
     "--engine must be one of ('xnnpack',) with --runtime executorch, got 'onnxruntime_7bit'"),
])
def test_bad_targets_are_one_line_and_exit_2(checkpoint_and_data, arguments, message, capsys):
    checkpoint, data = checkpoint_and_data
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", str(checkpoint), *arguments, *data])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-compress plan: error:") and message in err and err.count("\n") == 1
