"""`ft export`: which options each format takes, checked before anything loads, and the export they lead to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.export.runstage import ExportResult

FORMATS = ("adapter", "merged", "gguf")
CHOICES = {"--dtype": ("auto", "bf16", "fp16", "fp32"), "--merge-into": ("dequantized", "original")}
# Options of `ft export` and the formats that take them (the adapter export is the trained adapter, unchanged).
ONLY_FOR = {"--dtype": ("merged",), "--compare": ("merged",), "--quant": ("gguf",), "--merge-into": ("merged", "gguf"),
            "--max-kl": ("merged", "gguf"), "--verify-samples": ("merged", "gguf"), "--no-verify": ("merged", "gguf")}


def check_options(format_: str, given: dict[str, Any]) -> None:
    """Refuse an unknown format or choice, and options the format does not take (`given`: option -> value or
    None when not given)."""
    if format_ not in FORMATS:
        raise FinetuneError(f"--format {format_}: choose one of {', '.join(FORMATS)}")
    for option, allowed in CHOICES.items():
        if given.get(option) is not None and given[option] not in allowed:
            raise FinetuneError(f"{option} {given[option]}: choose one of {', '.join(allowed)}")
    wrong = [k for k, v in given.items() if v is not None and format_ not in ONLY_FOR[k]]
    if wrong:
        formats = " or ".join(f"--format {f}" for f in ONLY_FOR[wrong[0]])
        why = " (an adapter export is the trained adapter, unchanged)" if format_ == "adapter" else ""
        raise FinetuneError(f"{', '.join(wrong)}: only for {formats}{why}")


def export_run(run_dir: str | Path, format_: str = "adapter", stage: str | None = None, out: Path | None = None,
               overwrite: bool = False, verify: bool = True, compare: bool = False, **options: Any) -> ExportResult:
    """Export a finished stage of a run as `ft export` does.

    Args:
        run_dir: the run folder.
        format_: adapter, merged or gguf.
        stage: the stage (default: the last finished one).
        out: destination folder (default `<run>/export/<stage>-<format>`).
        overwrite: replace an existing `out`.
        verify: merged and gguf: compare the export with the model it must reproduce.
        compare: merged: also measure the other merge mode.
        **options: dtype, merge_into, max_kl, verify_samples (merged), quant (gguf); None means the default.
    """
    from finetune.export.runstage import open_run
    from finetune.run.lock import reading

    given = {"--dtype": options.get("dtype"), "--merge-into": options.get("merge_into"),
             "--max-kl": options.get("max_kl"), "--verify-samples": options.get("verify_samples"),
             "--quant": options.get("quant"), "--compare": compare or None, "--no-verify": None if verify else True}
    check_options(format_, given)
    with reading(Path(run_dir), "ft export"):  # a `ft train` of this run neither runs now nor starts until done
        run = open_run(run_dir, stage)
        kwargs = {k: v for k, v in options.items() if v is not None}
        try:
            return _export(run, format_, out, overwrite, verify, compare, kwargs)
        except (FinetuneError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # a library's error deep in a merge or reload: one line saying what to do
            merged_into = "original" if run.recipe.quantization.mode == "none" else kwargs.get("merge_into")
            raise FinetuneError(failure_line(format_, run.stage.name, e, merged_into)) from None


def failure_line(format_: str, stage: str, error: BaseException, merge_into: str | None = None) -> str:
    """One line for an export that failed unexpectedly: what failed, the library's first line, what to try."""
    first = (str(error).strip().splitlines() or [""])[0][:240]
    tries = [] if format_ == "adapter" else ["--format adapter (the trained adapter, loaded on the base with peft)"]
    if format_ in ("merged", "gguf") and merge_into != "original":
        tries.insert(0, "--merge-into original")
    todo = f"Try {' or '.join(tries)}; " if tries else ""
    return (f"{format_} export of stage '{stage}' failed and nothing was written: {type(error).__name__}: {first}. "
            f"{todo}please report it with the run's recipe.yaml")


def _export(run, format_: str, out: Path | None, overwrite: bool, verify: bool, compare: bool,
            kwargs: dict[str, Any]) -> ExportResult:
    if format_ == "adapter":
        from finetune.export.exports import export_adapter

        return export_adapter(run, out, overwrite=overwrite)
    if format_ == "gguf":
        from finetune.export.gguf import export_gguf

        return export_gguf(run, out, verify=verify, overwrite=overwrite, **kwargs)
    from finetune.export.exports import export_merged

    return export_merged(run, out, verify=verify, compare=compare, overwrite=overwrite, **kwargs)
