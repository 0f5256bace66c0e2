"""The benchmark registry: a name -> its reader, where its files live and its documented item count.

``--data-dir DIR`` is either the folder holding a benchmark's files or a root holding one folder per benchmark
named as the benchmark registry says (``DIR/medqa_usmle_4opt/``, ``DIR/vqa_rad/`` ...; :attr:`Benchmark.folder`), so one
root serves ``--benchmark medqa,vqa_rad``. Image paths of the items are made relative to ``DIR``.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lingshu_rl.eval.benchmarks import demo, image_demo, medmcqa, medqa, mmlu, pubmedqa, reports, slake, vqa_rad
from lingshu_rl.eval.benchmarks.base import BenchmarkError
from lingshu_rl.eval.items import EvalItem


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    read: Callable[[Path | None], list[EvalItem]]  # given None only when ``folder`` is None (no data needed)
    folder: str | None  # sub-folder of the data root in the shared layout; None: no data needed
    files: tuple[str, ...]  # files that mark the benchmark's folder (any one of them)
    count: int | None  # documented item count of the full file (None: not checked here)
    hf_id: str | None  # the Hugging Face dataset id of the same benchmark (reference only: not loaded)

    @property
    def needs_data(self) -> bool:
        return self.folder is not None


def _entry(name: str, title: str, module, count: int | None, read=None) -> Benchmark:
    return Benchmark(name, title, read or module.read, module.FOLDER, module.FILES, count, module.HF_ID)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    _entry("medqa", "MedQA (USMLE, 4 options) test", medqa, medqa.COUNT),
    _entry("medmcqa", "MedMCQA dev", medmcqa, medmcqa.COUNT),
    _entry("mmlu_medical", "MMLU medical (6 subjects) test", mmlu, mmlu.COUNT),
    _entry("pubmedqa", "PubMedQA PQA-L test", pubmedqa, pubmedqa.COUNT),
    _entry("vqa_rad", "VQA-RAD test", vqa_rad, vqa_rad.COUNT),
    _entry("slake", "SLAKE test (English)", slake, slake.COUNTS["en"]),
    _entry("slake_zh", "SLAKE test (Chinese)", slake, slake.COUNTS["zh"], functools.partial(slake.read, lang="zh")),
    _entry("reports", "Radiology report generation", reports, None),
    _entry("demo", "lingshu demo held-out split", demo, demo.COUNT),
    _entry("image_demo", "lingshu image demo held-out split", image_demo, image_demo.COUNT),
)}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def benchmark_folder(bench: Benchmark, data_dir: Path | None) -> Path | None:
    """The folder holding ``bench``'s files: ``data_dir/<folder>`` or ``data_dir`` itself."""
    if bench.folder is None:  # not bench.needs_data
        return None
    if data_dir is None:
        raise BenchmarkError(f"{bench.name}: --data-dir is required (the folder with {', '.join(bench.files)}, or "
                             f"a root holding {bench.folder}/); Hugging Face loading ({bench.hf_id}) is not "
                             "supported")
    for folder in (data_dir / bench.folder, data_dir):
        if any((folder / name).is_file() for name in bench.files):
            return folder
    raise BenchmarkError(f"{bench.name}: none of {', '.join(bench.files)} in {data_dir / bench.folder} or {data_dir}")


def load_items(name: str, data_dir: Path | None, limit: int | None = None) -> list[EvalItem]:
    """The benchmark's items in file order (the first ``limit`` of them), images relative to ``data_dir``."""
    bench = get_benchmark(name)
    folder = benchmark_folder(bench, data_dir)
    items = bench.read(folder)
    duplicates = [i for i, n in Counter(item.id for item in items).items() if n > 1]
    if duplicates:
        raise BenchmarkError(f"{name}: duplicate item ids {duplicates[:10]}")
    if folder is not None and data_dir is not None and folder != data_dir:  # data_dir is set when folder is
        prefix = folder.relative_to(data_dir)
        for item in items:
            item.images = [(prefix / image).as_posix() for image in item.images]
    return items[:limit] if limit is not None else items
