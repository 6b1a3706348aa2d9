"""Options are defined once, in the configs: the CLI, its --help and the README must agree."""

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line_error, run_cli

from clipcap_cache.errors import ClipcapError
from clipcap_cache.options import MISSING, defaults

COMMANDS = (
    "extract-features",
    "embed-text",
    "inspect",
    "train",
    "caption",
    "serve",
    "evaluate",
    "score",
    "demo",
    "export",
    "push",
)


def _commands():
    """Each command's registered options (`NamedOption`) and its click command, by name."""
    import cli

    return {name: (cli._COMMANDS[name].options(), cli._click_command(name)) for name in COMMANDS}


@pytest.fixture(scope="module")
def commands():
    return _commands()


def _flags(param) -> set[str]:
    return set(param.opts) | set(getattr(param, "secondary_opts", ()))


def _option(commands, name: str, flag: str):
    """The `NamedOption` and click parameter of `flag` on command `name`, or (None, None)."""
    options, command = commands[name]
    for param in command.params:
        if flag in _flags(param):
            spec = next(o for o in options if o.name == param.name)
            return spec, param
    return None, None


# ------------------------------------------------------------------ the CLI is the configs


def test_every_command_is_built_from_its_config_fields(commands):
    from clipcap_cache.evaluation.evaluate import EvalConfig
    from clipcap_cache.evaluation.score import ScoreConfig
    from clipcap_cache.extraction.features import FeatureConfig
    from clipcap_cache.extraction.text import TextConfig
    from clipcap_cache.inference.caption import CaptionConfig
    from clipcap_cache.inference.generate import DecodeConfig
    from clipcap_cache.inference.serve import ServeConfig
    from clipcap_cache.model import ModelConfig
    from clipcap_cache.sharing.export import ExportConfig
    from clipcap_cache.sharing.push import PushConfig
    from clipcap_cache.training.config import TrainConfig

    built_from = {
        "extract-features": [FeatureConfig],
        "embed-text": [TextConfig],
        "train": [TrainConfig, ModelConfig],
        "caption": [CaptionConfig, DecodeConfig],
        "serve": [ServeConfig],
        "evaluate": [EvalConfig, DecodeConfig],
        "score": [ScoreConfig],
        "export": [ExportConfig],
        "push": [PushConfig],
    }
    not_options = {"clip_embedding_dim", "decode", "strategy"}
    for name, classes in built_from.items():
        params = {p.name: p for p in commands[name][1].params}
        for cls in classes:
            for field in fields(cls):
                # extract-features' --decode says where JPEGs are decoded; elsewhere `decode` is
                # the nested DecodeConfig.
                option = not (cls is FeatureConfig and field.name == "decode")
                if (field.name in not_options and option) or (
                    name == "evaluate" and field.name == "num_captions"
                ):
                    assert field.name not in params
                    continue
                param = params[field.name]
                # The click default is the config's; a computed one is left to the config.
                if name == "extract-features" and field.name == "images":
                    assert field.default is MISSING and param.default is None  # tars have none
                elif field.default is not MISSING:
                    assert param.default == field.default, (name, field.name)
                elif field.default_factory is not MISSING:
                    assert param.default is None, (name, field.name)
                else:
                    assert param.required, (name, field.name)


def test_the_flag_forms_scripts_use_are_kept(commands):
    expected = {
        "train": [
            "--val",
            "--no-val",
            "--bertscore",
            "--no-bertscore",
            "--resume",
            "--overwrite",
            "--compile",
            "--normalize-prefix",
            "--config",
            "--init",
            "--freeze-layers",
        ],
        "extract-features": ["--strict", "--overwrite", "--images", "--split-default"],
        "caption": ["--greedy", "--sample", "--recursive", "--format", "--out", "--top-p"],
        "evaluate": ["--greedy", "--sample", "--spice", "--clipscore", "--no-bertscore"],
        "score": ["--spice", "--clipscore", "--bertscore", "--references"],
        "inspect": ["--json"],
        "demo": ["--fresh", "--workdir"],
        "serve": ["--max-upload-mb", "--batch-window-ms", "--host"],
        "export": ["--self-contained", "--base-clip", "--base-gpt2", "--dataset", "--overwrite"],
        "push": ["--repo", "--private", "--revision", "--self-contained", "--dataset"],
    }
    for name, flags in expected.items():
        for flag in flags:
            assert _option(commands, name, flag)[1] is not None, (name, flag)
    # Switches take no value; --no-greedy does not exist.
    for name, flag in [
        ("train", "--resume"),
        ("caption", "--greedy"),
        ("extract-features", "--strict"),
    ]:
        param = _option(commands, name, flag)[1]
        assert param.is_flag and not param.secondary_opts
    assert _option(commands, "caption", "--no-greedy")[1] is None
    # The arguments, in their places.
    arguments = {
        name: [p.name for p in command.params if p.param_type_name == "argument"]
        for name, (_, command) in commands.items()
    }
    assert arguments == {
        "extract-features": ["annotations"],
        "embed-text": ["source"],
        "inspect": ["features"],
        "train": ["features"],
        "caption": ["inputs"],
        "serve": [],
        "evaluate": ["checkpoint"],
        "score": ["predictions"],
        "demo": [],
        "export": ["source", "out"],
        "push": ["source"],
    }


def _help(name: str) -> str:
    result = run_cli(name, "--help", check=0)
    # The help wraps its lines, at hyphens too: keep the words only, whole.
    text = re.sub(r"(?<=\w-)\n\s+", "", result.stdout)
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_default_and_choice_list_of_the_config(commands, name):
    text = _help(name)
    for opt, param in (
        (o, p) for p in commands[name][1].params for o in commands[name][0] if o.name == p.name
    ):
        flag = param.opts[0]
        assert (opt.spec.metavar or flag) in text and opt.spec.help_text() in text, (name, flag)
        if opt.spec.choices:
            assert " | ".join(opt.spec.choices) in text, (name, flag)
        if opt.spec.default_text:
            assert f"[default: ({opt.spec.default_text})]" in text, (name, flag)
        elif param.default is not None and param.param_type_name == "option":
            if param.is_flag and not param.secondary_opts:
                continue  # a switch is off unless given
            if param.is_flag:  # a pair shows the side that is the default
                shown = (param.opts if param.default else param.secondary_opts)[0][2:]
            else:
                shown = param.default
            assert f"[default: {shown}]" in text, (name, flag)


def test_choice_lists_are_the_library_tuples(commands):
    from clipcap_cache.devices import DEVICES, PRECISIONS
    from clipcap_cache.inference.caption import OUTPUT_FORMATS
    from clipcap_cache.training import scst
    from clipcap_cache.training.config import OBJECTIVES

    for name, flag, choices in [
        ("train", "--device", DEVICES),
        ("serve", "--device", DEVICES),
        ("train", "--precision", PRECISIONS),
        ("train", "--objective", OBJECTIVES),
        ("train", "--reward", scst.REWARDS),
        ("caption", "--format", OUTPUT_FORMATS),
    ]:
        assert _option(commands, name, flag)[0].spec.choices is choices


def test_the_servers_form_fields_are_the_decoding_options(commands):
    import inspect

    from clipcap_cache.inference.serve import ServeConfig, create_app

    app = create_app(None, ServeConfig("unused"))
    endpoint = next(r.endpoint for r in app.routes if getattr(r, "path", "") == "/caption")
    form = {
        name: p.default
        for name, p in inspect.signature(endpoint).parameters.items()
        if name != "images"
    }
    caption = {p.name: p.default for p in commands["caption"][1].params}
    assert form == {name: caption[name] for name in form}
    assert set(form) == {
        "beams", "greedy", "sample", "num_captions", "max_tokens", "top_p", "temperature", "seed",
        "prompt",
    }  # fmt: skip


# ------------------------------------------------------------------ parsing into configs


def _capture(monkeypatch, module: str, function: str, result):
    """Replace the library call a command makes by one that records its arguments."""
    import importlib

    calls = []

    def record(*args):
        calls.append(args)
        return result

    monkeypatch.setattr(importlib.import_module(module), function, record)
    return calls


def test_train_builds_the_same_configs_as_before(monkeypatch, tmp_path):
    from clipcap_cache.model import ModelConfig
    from clipcap_cache.training.config import TrainConfig

    calls = _capture(monkeypatch, "clipcap_cache.training.train", "train", {"epoch": 1})
    run_cli("train", "f.h5", "--out", tmp_path / "run", check=0)
    train, model = calls[0]
    # The defaults these configs have always had.
    assert (train.epochs, train.batch_size, train.lr, train.warmup_steps) == (10, 40, 2e-5, 5000)
    assert (train.weight_decay, train.max_grad_norm, train.max_caption_tokens) == (0.01, 1.0, 40)
    assert (train.seed, train.eval_images, train.save_every_steps, train.samples) == (
        42,
        500,
        1000,
        5,
    )
    assert (train.validate, train.bertscore, train.bertscore_model) == (True, True, "roberta-large")
    assert (train.device, train.precision, train.objective) == ("auto", "auto", "xe")
    assert model == ModelConfig()
    assert train == TrainConfig(features="f.h5", out=str(tmp_path / "run"))

    calls.clear()
    run_cli(
        "train", "f.h5", "--out", tmp_path / "run", "--no-val", "--no-bertscore", "--lr", "1e-4",
        "--projector", "transformer", "--freeze-layers", "3", "--objective", "scst",
        "--reward", "cider+clip", "--resume", check=0,
    )  # fmt: skip
    train, model = calls[0]
    assert (train.validate, train.bertscore, train.lr, train.resume) == (False, False, 1e-4, True)
    assert (train.objective, train.reward) == ("scst", "cider+clip")
    assert (model.projector, model.freeze_layers) == ("transformer", 3)


def test_decoding_options_parse_into_the_decode_config(monkeypatch, tmp_path):
    from clipcap_cache.inference.generate import DecodeConfig

    calls = _capture(monkeypatch, "clipcap_cache.inference.caption", "caption", [])
    run_cli("caption", "a.jpg", "b.jpg", "--checkpoint", "ck", check=0)
    (config,) = calls[0]
    assert config.decode == DecodeConfig() == DecodeConfig("beam", 5, 1, 30, 0.9, 1.0, 0)
    assert (config.inputs, config.checkpoint, config.batch_size) == (["a.jpg", "b.jpg"], "ck", 16)
    assert (config.format, config.out, config.num_workers, config.device) == (
        "text",
        None,
        0,
        "auto",
    )

    calls.clear()
    run_cli(
        "caption",
        "a.jpg",
        "--checkpoint",
        "ck",
        "--sample",
        "--top-p",
        "0.5",
        "--num-captions",
        "3",
        check=0,
    )
    assert calls[0][0].decode == DecodeConfig("sample", num_captions=3, top_p=0.5)

    result = {"images": 1, "split": "test", "metrics": {"CIDEr": 1.0}, "skipped": [], "out": "o"}
    calls = _capture(monkeypatch, "clipcap_cache.evaluation.evaluate", "evaluate", result)
    run_cli("evaluate", "run", "--features", "f.h5", "--greedy", "--max-tokens", "12", check=0)
    (config,) = calls[0]
    assert config.decode == DecodeConfig("greedy", max_tokens=12)
    assert (config.split, config.batch_size, config.bertscore_model) == (
        "test",
        64,
        "roberta-large",
    )


def test_extract_features_builds_the_same_config_as_before(monkeypatch, tmp_path):
    from clipcap_cache.data.images import default_num_workers
    from clipcap_cache.extraction.features import ExtractSummary

    summary = ExtractSummary(out="c.h5", already_complete=True)
    calls = _capture(monkeypatch, "clipcap_cache.extraction.features", "extract_features", summary)
    run_cli("extract-features", "a.json", "--out", "c.h5", check=0)
    (config,) = calls[0]
    assert (config.annotations, config.images, config.out) == ("a.json", None, "c.h5")
    assert config.clip_model == "openai/clip-vit-base-patch32"
    assert config.num_workers == default_num_workers()
    assert (config.batch_size, config.shard_size, config.dtype) == (64, 2048, "float16")
    assert (config.split, config.format, config.image_processor) == ("all", "auto", "torchvision")
    assert config.decode == "auto"

    calls.clear()
    run_cli(
        "extract-features", "a.json", "--out", "c.h5", "--num-workers", "0", "--strict", check=0
    )
    assert (calls[0][0].num_workers, calls[0][0].strict) == (0, True)


def test_a_bad_choice_is_one_error_line_naming_the_choices():
    error = assert_one_line_error(run_cli("serve", "--checkpoint", "x", "--device", "tpu"))
    assert "--device must be one of auto, cpu, cuda, mps, not 'tpu'" in error


def test_ctrl_c_says_how_to_continue_only_where_a_command_can(monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    import clipcap_cache.evaluation.score as score
    import clipcap_cache.extraction.features as features

    monkeypatch.setattr(features, "extract_features", interrupted)
    monkeypatch.setattr(score, "score", interrupted)
    extract = run_cli("extract-features", "a.json", "--out", "c.h5")
    assert extract.returncode == 130
    assert "interrupted: run the same command again to resume" in extract.stderr
    scored = run_cli("score", "p.json", "--references", "r.json")
    assert scored.returncode == 130
    assert "interrupted" in scored.stderr and "resume" not in scored.stderr


# ------------------------------------------------------------------ precedence of train's sources


def _checkpoint(folder: Path, **model) -> Path:
    """A checkpoint folder as far as its config goes (the weights are not read here)."""
    from clipcap_cache.checkpoint import FORMAT_VERSION

    folder.mkdir(parents=True)
    config = {
        "format_version": FORMAT_VERSION,
        "clip_model": "c",
        "embedding_dim": 64,
        "model": model,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_the_sources_of_train_options_layer_in_order(tmp_path):
    from clipcap_cache.training.config import resolve_train_options

    out = tmp_path / "run"
    out.mkdir()
    saved = {"train": {"features": "f.h5", "out": "elsewhere", "lr": 1e-3, "epochs": 3, "seed": 7},
             "model": {"prefix_length": 4, "projector": "transformer", "clip_embedding_dim": 64}}  # fmt: skip
    (out / "config.json").write_text(json.dumps(saved))
    file = tmp_path / "options.json"
    file.write_text(json.dumps({"epochs": 5, "max-grad-norm": 2.0, "prefix_length": 6}))

    train, model = resolve_train_options(
        {"out": str(out), "resume": True, "seed": 9}, config_file=file
    )
    assert train.features == "f.h5"  # from the resumed run
    assert train.out == str(out)  # never from a file
    assert train.lr == 1e-3  # the resumed run's, over the default
    assert (train.epochs, train.max_grad_norm) == (5, 2.0)  # the file's, over the run's
    assert train.seed == 9  # explicit, over all
    assert (model.prefix_length, model.projector) == (6, "transformer")

    # Without --resume the run's config.json is not read.
    train, model = resolve_train_options({"features": "g.h5", "out": str(out)})
    assert (train.lr, train.epochs, model.prefix_length) == (2e-5, 10, 10)


def test_init_gives_the_model_below_the_file_and_the_flags(tmp_path):
    from clipcap_cache.training.config import resolve_train_options

    init = _checkpoint(tmp_path / "ckpt", gpt2_model="g", prefix_length=3, projector="transformer",
                       freeze_layers=1, clip_embedding_dim=64)  # fmt: skip
    file = tmp_path / "options.json"
    file.write_text(json.dumps({"model": {"prefix_length": 5}}))
    explicit = {"features": "f.h5", "out": str(tmp_path / "new"), "init": str(init)}
    train, model = resolve_train_options({**explicit, "freeze_layers": 2}, config_file=file)
    assert (model.gpt2_model, model.projector) == ("g", "transformer")  # the checkpoint's
    assert model.prefix_length == 5  # the file's
    assert model.freeze_layers == 2  # the flag's
    assert model.clip_embedding_dim == 512  # measured from the cache later, never taken over
    # An --init named in the config file counts too.
    file.write_text(json.dumps({"init": str(init)}))
    _, model = resolve_train_options({k: v for k, v in explicit.items() if k != "init"}, file)
    assert model.prefix_length == 3


def test_an_unknown_option_names_the_file_it_came_from(tmp_path):
    from clipcap_cache.training.config import resolve_train_options

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"train": {"lr": 1e-3, "lerning_rate": 1}}))
    with pytest.raises(
        ClipcapError, match=re.escape(f"{out / 'config.json'}: unknown options ['lerning_rate']")
    ):
        resolve_train_options({"features": "f.h5", "out": str(out), "resume": True})
    # Through the command line, without --config: the run's config.json is named, not None.
    error = assert_one_line_error(run_cli("train", "f.h5", "--out", out, "--resume"))
    assert error == f"error: {out / 'config.json'}: unknown options ['lerning_rate']"

    file = tmp_path / "options.json"
    file.write_text(json.dumps({"bogus": 1}))
    error = assert_one_line_error(
        run_cli("train", "f.h5", "--out", tmp_path / "new", "--config", file)
    )
    assert error == f"error: {file}: unknown options ['bogus']"
    with pytest.raises(ClipcapError, match=r"unknown options \['lrr'\]"):
        resolve_train_options({"features": "f.h5", "out": "o", "lrr": 1})


def test_the_defaults_of_a_config_are_its_fields():
    from clipcap_cache.inference.generate import DecodeConfig

    assert defaults(DecodeConfig) == {
        "strategy": "beam", "beams": 5, "num_captions": 1, "max_tokens": 30, "top_p": 0.9,
        "temperature": 1.0, "seed": 0, "prompt": None,
    }  # fmt: skip


# ------------------------------------------------------------------ the README


SECTION_COMMANDS = {
    "clipcap extract-features": ("extract-features", "inspect"),
    "clipcap embed-text": ("embed-text",),
    "Captions from retrieval": ("train", "caption", "evaluate", "serve", "embed-text"),
    "from text alone": ("train", "embed-text"),
    "clipcap train": ("train",),
    "Many GPUs": ("train", "extract-features"),
    "clipcap caption": ("caption",),
    "clipcap serve": ("serve",),
    "clipcap evaluate": ("evaluate",),
    "clipcap score": ("score",),
    "clipcap export": ("export", "push"),
    "SCST": ("train",),
    "Share a model": ("export", "push", "caption", "evaluate", "serve", "train"),
}
NOT_OURS = {"--only_prefix"}  # ClipCap's own flag, named for comparison
# After an option's code span: "(16)", "(default `x`;", "(`gpt2`;", or a number: "`--lr` 2e-5,".
DEFAULT_AFTER = [
    re.compile(r"\s*\((?:default )?`?([^\s`();,]+)`?[);,]"),
    re.compile(r"\s+(-?\d[\d.e+-]*)(?=[\s,;)])"),
]


def _readme_sections() -> list[tuple[tuple[str, ...], str]]:
    text = (REPO / "README.md").read_text()
    sections = []
    for part in re.split(r"\n(?=#{2,3} )", text):
        title = part.splitlines()[0]
        names = next((c for key, c in SECTION_COMMANDS.items() if key in title), COMMANDS)
        sections.append((names, part))
    return sections


def _readme_mentions():
    """Every `--option` the README names: (commands it may belong to, flag, value, default)."""
    found = []
    for names, text in _readme_sections():
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        # Command lines in code blocks and code spans: the options follow `clipcap COMMAND`.
        lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`([^`]*clipcap [^`]*)`", prose)
        for line in lines:
            match = re.search(r"\bclipcap ([a-z-]+)(.*)", line.split("#")[0])
            if not match:
                continue
            tokens = match.group(2).split()
            for i, token in enumerate(tokens):
                if token.startswith("--"):
                    value = tokens[i + 1] if i + 1 < len(tokens) else None
                    found.append(((match.group(1),), token, value, None))
        for span in re.finditer(r"`((?:[a-z-]+ )?--[^`]*)`", prose):
            if "clipcap " in span.group(1):
                continue
            words = span.group(1).split()
            scope = names
            if not words[0].startswith("--"):  # `train --overwrite`
                scope, words = (words[0],), words[1:]
            after = prose[span.end() : span.end() + 60]
            default = next((m.group(1) for p in DEFAULT_AFTER if (m := p.match(after))), None)
            if len(words) > 1 and "|" in words[1] and default not in words[1].split("|"):
                default = None  # `--dtype float16|float32` (storage): a note, not a default
            for i, word in enumerate(words):
                if word.startswith("--"):
                    value = words[i + 1] if i + 1 < len(words) else None
                    found.append((scope, word, value, default if len(words) <= 2 else None))
    return found


def _same(readme_value: str, default) -> bool:
    if isinstance(default, bool):
        return False
    if isinstance(default, int | float):
        try:
            return float(readme_value) == default
        except ValueError:
            return False
    return readme_value == str(default)


def test_the_readme_names_only_options_that_exist_with_the_configs_defaults(commands):
    mentions = _readme_mentions()
    assert len(mentions) > 100  # the parse found the README's options
    checked_defaults = set()
    for scope, flag, value, default in mentions:
        flag = flag.split("=")[0].rstrip(".,;:)")
        if flag in NOT_OURS or flag == "--help":
            continue
        found = [(n, *_option(commands, n, flag)) for n in scope]
        found = [(n, opt, param) for n, opt, param in found if param is not None]
        assert found, f"README: {flag} is not an option of {' or '.join(scope)}"
        for name, opt, param in found:
            takes_value = not getattr(param, "is_flag", False)
            if takes_value and opt.spec.choices and value and not value.isupper():
                listed = value.rstrip(".,;:)").split("|")
                if all(v.isidentifier() or "+" in v or v.isalnum() for v in listed):
                    assert set(listed) <= set(opt.spec.choices), (name, flag, value)
        if default is not None and any(getattr(p, "is_flag", False) is False for _, _, p in found):
            assert any(_same(default, param.default) for _, _, param in found), (
                f"README gives {flag} the default {default}; "
                f"{', '.join(f'{n} has {p.default!r}' for n, _, p in found)}"
            )
            checked_defaults.add(flag)
    # The defaults the README gives, in every form it gives them, were all found and compared.
    assert {
        "--lr", "--epochs", "--batch-size", "--warmup-steps", "--max-grad-norm", "--prefix-length",
        "--eval-images", "--bertscore-model", "--save-every-steps", "--gpt2-model", "--clip-model",
        "--beams", "--max-tokens", "--samples", "--reward", "--baseline", "--cider-weight",
        "--clip-weight", "--max-upload-mb", "--max-images", "--max-queue", "--max-batch",
        "--batch-window-ms", "--split-default", "--max-caption-tokens", "--decode",
    } <= checked_defaults  # fmt: skip


def test_a_readme_default_that_differs_from_the_config_is_caught(commands, monkeypatch):
    text = (REPO / "README.md").read_text()
    assert "`--beams` (5)" in text
    monkeypatch.setattr(
        Path, "read_text", lambda self, *a, **k: text.replace("`--beams` (5)", "`--beams` (4)")
    )
    with pytest.raises(AssertionError, match="--beams the default 4"):
        test_the_readme_names_only_options_that_exist_with_the_configs_defaults(commands)


def test_the_command_list_is_shown_without_building_any_command():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0 and 'extract-features' in result.stdout, result.stdout\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
