"""Model references as people write them, and pushing a model folder to the Hugging Face Hub.

A model reference (in a recipe, an evolve/fuse config, ``umm eval MODEL``, ``umm-node join
--model``) is one of:

- a local folder (``~`` expanded; a relative path read from ``base_dir``, else the current
  directory). A folder that exists always wins over the forms below;
- ``org/name`` or ``org/name@revision`` (branch, tag or commit): a Hugging Face Hub repo, fetched
  with :func:`huggingface_hub.snapshot_download` into its cache (``HF_HOME`` / ``HF_HUB_CACHE``),
  offline from the cache when ``HF_HUB_OFFLINE=1``, with the token from ``HF_TOKEN`` or
  ``hf auth login``. Only safetensors weights, JSON configs and tokenizer files at the top of the
  repo are downloaded (:data:`ALLOW_PATTERNS`), never pickle weights;
- ``model+adapter``: a PEFT LoRA adapter folder (either part local or a hub id) applied in memory
  when the merge reads the model (:mod:`umm.checkpoints.lora`).

Each way a reference can fail has its own :class:`~umm.checkpoints.errors.CheckpointError`
subclass whose message says what to do. Progress of a download goes to a
:class:`~umm.progress.ProgressSink`; this module prints nothing.

:func:`push_folder` uploads a model folder: :func:`plan_push` builds the typed
:class:`PushPlan` (files, card, commit message) without a network, :func:`execute_push` runs it
with :class:`huggingface_hub.HfApi` (``create_repo(exist_ok=True)`` + ``upload_folder``).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umm.checkpoints.errors import CheckpointError, NotSafetensorsError
from umm.progress import ProgressBar, ProgressSink, open_bar

#: what a download fetches: weights (safetensors only), configs, tokenizer files, chat templates
ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors", "*.json", "tokenizer.model", "spiece.model", "*.tiktoken", "*.txt", "*.jinja",
)
#: never fetched: anything in a sub-folder (other formats, originals), pickle weights, and the
#: ``consolidated*`` copy of the weights some repos (Mistral's) keep beside the transformers shards
IGNORE_PATTERNS: tuple[str, ...] = ("*/*", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "consolidated*")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKEN_HELP = "set HF_TOKEN (or run `hf auth login`)"

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[^\s@+]+))?$")


class ModelNotFoundError(CheckpointError):
    """A reference that is neither an existing folder nor a hub id."""


class NotCachedOfflineError(CheckpointError):
    """A hub id whose files are not in the hub cache while ``HF_HUB_OFFLINE`` forbids downloads."""


class HubRepoNotFoundError(CheckpointError):
    """The hub has no such repo or revision (or it is private and no token grants access)."""


class GatedRepoError(CheckpointError):
    """The repo is gated: its terms must be accepted and a token given."""


class HubUnreachableError(CheckpointError):
    """The hub could not be reached (and the cache did not have the files)."""


class AdapterAsModelError(CheckpointError):
    """A LoRA adapter folder given where a full model was expected."""


class PickleOnlyError(NotSafetensorsError):
    """A hub repo that publishes only pickle weights (``.bin``/``.pt``)."""


class AdapterNotSupportedError(CheckpointError):
    """``model+adapter`` given where umm loads the model whole (not through a merge)."""


class HubPushError(CheckpointError):
    """Uploading to the hub failed (no token, no permission, network)."""


# ---------------------------------------------------------------------------------- references


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: a local ``path``, or a hub ``repo_id`` at ``revision``, plus an
    optional ``adapter`` (itself a :class:`ModelRef`, never with an adapter)."""

    text: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    adapter: ModelRef | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None


@dataclass(frozen=True)
class ResolvedModel:
    """Where a reference's files are on this machine: the model ``folder`` (a hub snapshot for a hub
    id) and the ``adapter`` folder to apply, if any. ``ref`` is the reference as written."""

    ref: str
    folder: Path
    adapter: Path | None = None
    repo_id: str | None = None
    revision: str | None = None


def _local(text: str, base_dir: Path | None) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() or base_dir is None else base_dir / p


def parse_ref(text: str, *, base_dir: str | Path | None = None) -> ModelRef:
    """Parse ``text``: an existing folder, ``org/name[@rev]``, ``model+adapter``, else a local path
    (which :func:`resolve` reports as not found)."""
    text = str(text).strip()
    base = Path(base_dir) if base_dir is not None else None
    local = _local(text, base)
    if local.exists():
        return ModelRef(text, path=local)
    if "+" in text:
        model, _, adapter = text.partition("+")
        inner = parse_ref(adapter, base_dir=base)
        if inner.adapter is not None or not model or not adapter:
            raise ModelNotFoundError(f"model reference {text!r}: write MODEL+ADAPTER, with one '+'")
        return _with_adapter(parse_ref(model, base_dir=base), inner, text)
    repo = parse_repo_id(text)
    if repo is not None:
        return ModelRef(text, repo_id=repo, revision=_REPO_ID.match(text)["rev"])  # type: ignore[index]
    return ModelRef(text, path=local)


def _with_adapter(model: ModelRef, adapter: ModelRef, text: str) -> ModelRef:
    return ModelRef(text, path=model.path, repo_id=model.repo_id, revision=model.revision, adapter=adapter)


def parse_repo_id(text: str) -> str | None:
    """``org/name`` of ``org/name`` or ``org/name@rev``; ``None`` when ``text`` is not shaped as a hub id."""
    m = _REPO_ID.match(text.strip())
    return m["repo"] if m and ".." not in text and not text.strip().startswith((".", "~")) else None


def is_hub_ref(text: str, *, base_dir: str | Path | None = None) -> bool:
    """Whether ``text`` needs :func:`resolve` (a hub id or ``model+adapter``), not just a path rule."""
    ref = parse_ref(text, base_dir=base_dir)
    return ref.is_hub or ref.adapter is not None


def resolve(text: str, *, base_dir: str | Path | None = None, on_progress: ProgressSink | None = None) -> ResolvedModel:
    """The local files of model reference ``text`` (hub ids downloaded into, or read from, the cache).

    Raises :class:`ModelNotFoundError`, :class:`NotCachedOfflineError`, :class:`HubRepoNotFoundError`,
    :class:`GatedRepoError`, :class:`HubUnreachableError`, :class:`AdapterAsModelError` or
    :class:`PickleOnlyError`, each naming the reference and the fix.
    """
    ref = parse_ref(text, base_dir=base_dir)
    folder, revision = _fetch(ref, on_progress)
    adapter = None
    if ref.adapter is not None:
        adapter, _ = _fetch(ref.adapter, on_progress)
        if not (adapter / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"{text}: {ref.adapter.text} is not a PEFT adapter (no adapter_config.json in {adapter})"
            )
    _refuse_adapter(text.partition("+")[0] if adapter is not None else text, folder)
    return ResolvedModel(text, folder, adapter, ref.repo_id, revision)


def resolve_folder(text: str, *, base_dir: str | Path | None = None,
                   on_progress: ProgressSink | None = None, real_files: bool = False) -> Path:
    """The model folder of ``text`` for a command that loads the model whole (eval, evolve, fuse,
    a node): as :func:`resolve`, refusing ``model+adapter`` (merge it first). ``real_files``: a hub
    snapshot (symlinks into the cache's blobs) is given as a folder of plain files
    (:func:`materialize`), for code that refuses links, such as a node's manifest."""
    r = resolve(text, base_dir=base_dir, on_progress=on_progress)
    if real_files and r.adapter is None:
        return materialize(r.folder)
    if r.adapter is not None:
        raise AdapterNotSupportedError(
            f"{text}: a model+adapter reference is applied in merge recipes only; write the adapted "
            "model first (a recipe with `merge_method: linear` and the one model MODEL+ADAPTER, "
            "run with `umm merge`) and give its folder here"
        )
    return r.folder


def snapshot_root(folder: Path) -> Path | None:
    """The cache folder (``models--org--name``) of a hub snapshot folder, whose files are links into
    its ``blobs``; ``None`` for any other folder."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return None


def materialize(folder: Path) -> Path:
    """A hub snapshot's files as plain files (hard links to the blobs where the filesystem allows,
    else copies) in ``<umm home>/hub/<models--org--name>/<commit>``, made once; other folders as is.
    Only links that resolve inside the snapshot's own cache folder are followed."""
    import shutil

    from umm.paths import home

    root = snapshot_root(folder)
    if root is None:
        return folder
    target = home() / "hub" / root.name / folder.name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for entry in sorted(folder.iterdir()):
            src = entry.resolve()
            if not src.is_file() or root.resolve() not in src.parents:
                raise CheckpointError(f"{entry}: a snapshot file that is not a link into {root}; the cache is damaged")
            try:
                os.link(src, tmp / entry.name)
            except OSError:
                shutil.copyfile(src, tmp / entry.name)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process made it meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _refuse_adapter(text: str, folder: Path) -> None:
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise AdapterAsModelError(
            f"{text} is a LoRA adapter (adapter_config.json, no config.json), not a model: write "
            "BASE+ADAPTER (e.g. org/base-model+{text}) to apply it to its base model"
        )


def _fetch(ref: ModelRef, on_progress: ProgressSink | None) -> tuple[Path, str | None]:
    """The folder of a reference without adapter: the local path, or the hub snapshot."""
    if ref.repo_id is None:
        assert ref.path is not None
        if not ref.path.exists():
            raise ModelNotFoundError(
                f"model folder not found: {ref.text} (looked for {ref.path.absolute()}; relative paths are "
                "read from the current directory, or a config file's folder); give an existing folder or a "
                "Hugging Face Hub id such as org/name or org/name@revision"
            )
        if not ref.path.is_dir():
            raise ModelNotFoundError(f"{ref.text}: is a file; give the model folder")
        return ref.path, None
    folder = snapshot(ref.repo_id, ref.revision, on_progress=on_progress, what=ref.text)
    return folder, folder.name


# ---------------------------------------------------------------------------------- the hub cache


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path | None:
    """``HF_HUB_CACHE``, else ``HF_HOME/hub``, as set now; ``None``: huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return None


def snapshot(repo_id: str, revision: str | None = None, *, on_progress: ProgressSink | None = None,
             what: str | None = None) -> Path:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (default branch when ``None``),
    downloading the allowed files first unless offline; see the module docstring for errors."""
    from huggingface_hub import errors as hf
    from huggingface_hub import snapshot_download

    what = what or (repo_id if revision is None else f"{repo_id}@{revision}")
    offline = hub_offline()
    try:
        with _quiet_hub_bars():
            folder = Path(snapshot_download(
                repo_id, revision=revision, cache_dir=hub_cache_dir(), local_files_only=offline,
                allow_patterns=list(ALLOW_PATTERNS), ignore_patterns=list(IGNORE_PATTERNS),
                tqdm_class=sink_tqdm(on_progress, what),  # type: ignore[arg-type]
            ))
    except hf.GatedRepoError:
        raise GatedRepoError(
            f"{what}: the repo is gated: accept its terms at https://huggingface.co/{repo_id} and {TOKEN_HELP}"
        ) from None
    except hf.RevisionNotFoundError:
        raise HubRepoNotFoundError(f"{what}: the repo has no revision {revision!r} (a branch, tag or commit)") from None
    except hf.RepositoryNotFoundError:
        raise HubRepoNotFoundError(
            f"{what}: no such model folder here and no such repo on the Hugging Face Hub "
            f"(https://huggingface.co/{repo_id}); check the spelling, or if it is private {TOKEN_HELP}"
        ) from None
    except hf.LocalEntryNotFoundError:
        if offline:
            raise NotCachedOfflineError(
                f"{what}: no such folder here, and not in the hub cache "
                f"({hub_cache_dir() or 'huggingface_hub default'}) while "
                f"HF_HUB_OFFLINE=1 forbids downloading it: download it once online with "
                f"`hf download {repo_id}{f' --revision {revision}' if revision else ''} --include "
                f"'*.safetensors' '*.json' 'tokenizer.model' '*.txt'`, or unset HF_HUB_OFFLINE"
            ) from None
        raise HubUnreachableError(
            f"{what}: no such folder here, the Hugging Face Hub cannot be reached and the files are not in the cache; "
            "check the network (or a proxy), or download it where there is one"
        ) from None
    except (hf.HfHubHTTPError, OSError) as exc:
        raise HubUnreachableError(f"{what}: downloading from the Hugging Face Hub failed: {exc}") from None
    _check_weights(folder, repo_id, revision, what, offline)
    return folder


def _check_weights(folder: Path, repo_id: str, revision: str | None, what: str, offline: bool) -> None:
    """Refuse a snapshot with no safetensors weights, naming a pickle-only repo as such."""
    if any(p.suffix == ".safetensors" for p in folder.iterdir()):
        return
    if (folder / "adapter_config.json").is_file():
        return  # an adapter without weights is reported by the LoRA reader
    pickles = [p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
    if not pickles and not offline:
        pickles = _remote_pickles(repo_id, revision)
    if pickles:
        raise PickleOnlyError(
            f"{what}: the repo publishes only pickle weights ({', '.join(sorted(pickles)[:3])}); umm refuses "
            "them because unpickling runs arbitrary code: use a safetensors version of the model (many repos "
            "have a refs/pr/N conversion: org/name@refs/pr/N), or convert it yourself in a sandbox"
        )


def _remote_pickles(repo_id: str, revision: str | None) -> list[str]:
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
    except Exception:  # only used to word the error better; the missing weights are reported anyway
        return []
    return [f for f in files if "/" not in f and f.endswith(PICKLE_SUFFIXES)]


class _quiet_hub_bars:
    """Turn huggingface_hub's own (stderr) progress bars off for the call: progress goes to the sink."""

    _lock = threading.Lock()

    def __enter__(self) -> None:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        with self._lock:
            self.was = are_progress_bars_disabled()
            if not self.was:
                disable_progress_bars()

    def __exit__(self, *exc: object) -> None:
        from huggingface_hub.utils import enable_progress_bars

        with self._lock:
            if not self.was:
                enable_progress_bars()


def sink_tqdm(sink: ProgressSink | None, what: str) -> type:
    """A class shaped like ``tqdm`` (what ``snapshot_download(tqdm_class=...)`` accepts) whose bars
    go to ``sink``, labelled ``download WHAT: ...``."""

    class SinkTqdm:
        _lock = threading.RLock()
        disable = False

        def __init__(self, iterable: Iterable[Any] | None = None, *args: Any, total: float | None = None,
                     desc: str | None = None, unit: str = "it", initial: float = 0, **kwargs: Any) -> None:
            self.iterable = iterable
            self.total = total
            self.n = initial
            label = f"download {what}" + (f": {desc}" if desc else "")
            self._bar: ProgressBar = open_bar(sink, total or None, label, "B" if unit == "B" else "file")
            if initial:
                self._bar.advance(initial)

        def __iter__(self) -> Iterator[Any]:
            for item in self.iterable or ():
                yield item
                self.update(1)
            self.close()

        def update(self, n: float | None = 1) -> None:
            self.n += n or 0
            self._bar.advance(n or 0)

        def close(self) -> None:
            self._bar.close()
            self._bar = open_bar(None, None, "", "")

        def __enter__(self) -> SinkTqdm:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

        @classmethod
        def get_lock(cls) -> threading.RLock:
            return cls._lock

        @classmethod
        def set_lock(cls, lock: Any) -> None:
            cls._lock = lock

        @property
        def format_dict(self) -> dict[str, Any]:
            return {"n": self.n, "total": self.total, "rate": None}

        def __getattr__(self, name: str) -> Any:  # refresh, set_description, set_postfix_str ...
            return lambda *a, **k: None

    return SinkTqdm


# ------------------------------------------------------------------------------------------ push

#: files never uploaded from a model folder (umm's own bookkeeping)
PUSH_IGNORE: tuple[str, ...] = (".*", "**/.*", "*.partial-*", "__pycache__/*")


@dataclass(frozen=True)
class PushPlan:
    """One upload: the ``files`` of ``folder`` (relative, sorted) to ``repo_id``, its visibility, the
    commit message, and the model card (``README.md``) text that goes with it."""

    repo_id: str
    folder: Path
    files: tuple[str, ...]
    private: bool
    commit_message: str
    card: str

    @property
    def total_bytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.files)


@dataclass(frozen=True)
class PushResult:
    """Where the upload went: the repo URL and the commit."""

    plan: PushPlan
    repo_url: str
    commit_url: str | None


def check_repo_id(repo_id: str) -> None:
    """Refuse a ``--push-to-hub`` target that is not ``org/name`` (before any work, no network)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubPushError(f"--push-to-hub {repo_id!r} is not a repo id ({exc}); write org/name") from None
    if "/" not in repo_id:
        raise HubPushError(f"--push-to-hub {repo_id!r}: write the repo as org/name (your user name or an organisation)")


def plan_push(folder: str | Path, repo_id: str, *, private: bool = False, commit_message: str | None = None) -> PushPlan:
    """The upload of ``folder`` to ``repo_id``, checked without a network: a valid repo id, a model
    folder with safetensors weights, ``config.json`` and a ``README.md`` model card."""
    check_repo_id(repo_id)
    root = Path(folder)
    if not (root / "config.json").is_file():
        raise HubPushError(f"{root}: no config.json; only a finished model folder is pushed")
    files = tuple(sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and not _ignored(p.relative_to(root).as_posix())
    ))
    if not any(f.endswith(".safetensors") for f in files):
        raise HubPushError(f"{root}: no safetensors weights to push")
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise HubPushError(f"{root}: holds pickle files ({', '.join(pickles[:3])}); umm pushes safetensors only")
    card_path = root / "README.md"
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else ""
    if not card:
        raise HubPushError(f"{root}: no README.md model card; write the model with umm (merge, evolve, fuse) first")
    message = commit_message or f"Upload {root.name} with umm"
    return PushPlan(repo_id, root.absolute(), files, private, message, card)


def _ignored(rel: str) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(rel, pat) for pat in PUSH_IGNORE) or any(part.startswith(".") for part in rel.split("/"))


def execute_push(plan: PushPlan, *, api: Any | None = None) -> PushResult:
    """Create ``plan.repo_id`` if needed and upload the planned files in one commit (token: ``HF_TOKEN``
    or ``hf auth login``). ``api`` replaces :class:`huggingface_hub.HfApi` (tests)."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf

    if hub_offline():
        raise HubPushError(f"cannot push to {plan.repo_id}: HF_HUB_OFFLINE=1 forbids network access; unset it")
    api = api if api is not None else HfApi()
    try:
        url = api.create_repo(plan.repo_id, private=plan.private, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=plan.repo_id, folder_path=str(plan.folder), repo_type="model",
                                 commit_message=plan.commit_message, allow_patterns=list(plan.files))
    except hf.LocalTokenNotFoundError:
        raise HubPushError(f"cannot push to {plan.repo_id}: no Hugging Face token; {TOKEN_HELP} with write access") from None
    except hf.HfHubHTTPError as exc:
        raise HubPushError(
            f"pushing to {plan.repo_id} failed: {exc}; check that your token ({TOKEN_HELP}) may write there"
        ) from None
    except OSError as exc:
        raise HubPushError(f"pushing to {plan.repo_id} failed: {exc}") from None
    return PushResult(plan, str(url), getattr(info, "commit_url", None))


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, commit_message: str | None = None,
                api: Any | None = None) -> PushResult:
    """Upload the model ``folder`` to the hub repo ``repo_id`` (created if needed): :func:`plan_push`
    then :func:`execute_push`. The entry point for ``--push-to-hub`` and the coordinator."""
    return execute_push(plan_push(folder, repo_id, private=private, commit_message=commit_message), api=api)


def open_model(text: str, *, base_dir: str | Path | None = None, on_progress: ProgressSink | None = None) -> Any:
    """:func:`resolve` ``text`` and open it headers-only: a :class:`~umm.checkpoints.reader.Checkpoint`,
    or for ``model+adapter`` a :class:`~umm.checkpoints.lora.LoraCheckpoint` reading adapted tensors."""
    from umm.checkpoints.lora import LoraCheckpoint
    from umm.checkpoints.reader import Checkpoint

    r = resolve(text, base_dir=base_dir, on_progress=on_progress)
    return LoraCheckpoint.open(r.folder, r.adapter) if r.adapter is not None else Checkpoint.open(r.folder)
