"""Read back what a real TensorBoardLogger wrote, so tests assert on logged values."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series under ``log_dir`` (searched recursively), as ``{tag: [(step, value), ...]}``."""
    series: dict[str, list[tuple[int, float]]] = {}
    for event_file in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return series


def read_texts(log_dir: str | Path) -> dict[str, list[str]]:
    """All text summaries under ``log_dir`` (searched recursively), as ``{tag: [text, ...]}`` (``/text_summary`` dropped)."""
    texts: dict[str, list[str]] = {}
    for event_file in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file), size_guidance={"tensors": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["tensors"]:
            if tag.endswith("/text_summary"):
                texts.setdefault(tag[:-len("/text_summary")], []).extend(
                    e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors(tag))
    return texts
