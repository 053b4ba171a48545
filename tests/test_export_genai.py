"""An exported folder runs as is under onnxruntime-genai: its genai_config.json names the graph's I/O,
its tokenizer.json encodes exactly as sentencepiece does (in the tokenizers library and in genai's
own tokenizer), and genai's greedy tokens equal the PyTorch model's."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import sentencepiece as spm
from conftest import SMALL_MIXTRAL, save_model
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from mixtral_quant.artifact import write_manifest
from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.export import MODEL_FILE, Target, export_onnx
from mixtral_quant.export.genai import GENAI_CONFIG, genai_config, write_genai_files
from mixtral_quant.generate import Sampling, generate
from mixtral_quant.hf_tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON, read_sentencepiece
from mixtral_quant.loading import load_model, new_model
from mixtral_quant.quant import MethodName, QuantConfig, get_method
from mixtral_quant.tokenizer import Tokenizer

og = pytest.importorskip("onnxruntime_genai")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
TINY_ASSET = ROOT / "mixtral_quant" / "assets" / "tiny-mixtral"
CORPORA = [ROOT / "calibration" / "corpora" / f"{name}.txt" for name in ("wiki-train", "wiki-test", "sotu")]
GPTQ4 = QuantConfig.of(MethodName.RTN, bits=4, group_size=32)  # stored in the GPTQ layout; 32 divides 64, 96, 128, 384
PROMPT = "The capital of France is"
NEW_TOKENS = 10
# Beside the corpus sample: the usual traps (runs of spaces, leading and trailing spaces, digits,
# tabs and newlines, accents, scripts and emoji that fall back to bytes, contractions inside words).
EDGE_CASES = [
    "",
    " ",
    "   ",
    "a  b   c",
    "   leading",
    "trailing   ",
    " " * 17 + "x",
    "\t tab\tand\nnew\n\nlines\r\n",
    "12345 3.14159 1,000,000 2024-01-31",
    "héllo wörld ñ e\u0301 Ελληνικά Русский עברית العربية हिन्दी",
    "日本語のテキスト" * 20,
    "🦙🤗 emoji \U0001f9e0 \u200b\u00a0\u3000 ∑∫√ ≤≥ ⓐⓑ \x01\x7f",
    "I'm Mu'min, DON'T i'thar Ty'Sheoma",
    "a" * 300,
    "https://example.com/a_long_path_without_spaces_0123456789_abcdefghijklmnopqrstuvwxyz",
    "[INST] What is 2+2? [/INST] 4",
]


def is_quantized_linear(name: str) -> bool:
    """Attention projections and experts; never the router (block_sparse_moe.gate) or lm_head."""
    return name.endswith(".weight") and (".self_attn." in name or ".experts." in name)


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The embedded tiny model once it is trained, else a small random Mixtral with the real vocabulary;
    and a 4-bit GPTQ-layout copy of it (round-to-nearest, Hub names, quantization_config)."""
    root = tmp_path_factory.mktemp("variants")
    if (TINY_ASSET / "model.safetensors").is_file():
        fp32 = TINY_ASSET
    else:
        fp32 = save_model(new_model(replace(SMALL_MIXTRAL, vocab_size=32000), seed=5), root / "fp32")
        shutil.copyfile(TINY_ASSET / "tokenizer.model", fp32 / "tokenizer.model")
    model = load_model(fp32)
    method = get_method(GPTQ4)
    tensors = {}
    for name, t in model.state_dict().items():
        if is_quantized_linear(name):
            stored = method.quantize(t.float()).tensors
            tensors.update({f"{name.removesuffix('.weight')}.{k}": v.contiguous() for k, v in stored.items()})
        else:
            tensors[name] = t.contiguous()
    gptq = root / "gptq4"
    gptq.mkdir()
    save_file(tensors, str(gptq / "model.safetensors"))
    model.cfg.save(gptq / "config.json", {"quantization_config": method.quantization_config()})
    shutil.copyfile(fp32 / "tokenizer.model", gptq / "tokenizer.model")
    write_manifest(gptq, {})  # quantized folders are read only with a manifest, as the tool writes them
    return {"fp32": fp32, "gptq4": gptq}


@pytest.fixture(scope="module")
def exports(variants: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, Target], Path]:
    root = tmp_path_factory.mktemp("onnx")
    cases = [("fp32", Target.ORT), ("gptq4", Target.ORT), ("fp32", Target.STANDARD)]
    return {(v, t): export_onnx(variants[v], root / f"{v}-{t.value}", t, progress=False) for v, t in cases}


def genai_greedy(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt) :]


@pytest.mark.parametrize(
    ("variant", "target"), [("fp32", Target.ORT), ("gptq4", Target.ORT), ("fp32", Target.STANDARD)], ids=str
)
def test_genai_generates_like_pytorch(
    variants: dict[str, Path], exports: dict[tuple[str, Target], Path], variant: str, target: Target
) -> None:
    """From text to text with genai alone: its tokenizer gives sentencepiece's prompt ids (BOS when
    asked), its greedy tokens equal mixtral_quant.generate's, its decoding equals sentencepiece's."""
    folder = exports[(variant, target)]
    tokenizer = og.Tokenizer(og.Model(str(folder)))
    tokenizer.update_options(add_special_tokens="true")
    prompt = [int(t) for t in tokenizer.encode(PROMPT)]
    sp = Tokenizer(variants[variant])
    assert prompt == sp.encode(PROMPT)

    tokens = genai_greedy(folder, prompt, NEW_TOKENS)
    model = load_model(variants[variant], no_verify=True)  # the test variant has no manifest
    assert tokens == generate(model, prompt, Sampling(max_new_tokens=NEW_TOKENS), eos_id=model.cfg.eos_token_id)
    assert tokenizer.decode(prompt + tokens) == sp.decode(prompt + tokens)


def test_genai_config_names_the_graph(exports: dict[tuple[str, Target], Path]) -> None:
    """Every name genai_config.json gives is a graph input or output, and the KV buffer is shared
    only where GroupQueryAttention can take it (the ORT target)."""
    for (_, target), folder in exports.items():
        config = json.loads((folder / GENAI_CONFIG).read_text())
        decoder = config["model"]["decoder"]
        graph = onnx.load(str(folder / decoder["filename"]), load_external_data=False).graph
        layers = range(decoder["num_hidden_layers"])
        names = decoder["inputs"] | decoder["outputs"]
        expected = {names[k] for k in ("input_ids", "attention_mask", "logits")}
        for key in ("past_key_names", "past_value_names", "present_key_names", "present_value_names"):
            expected |= {names[key] % i for i in layers}
        assert expected == {v.name for v in graph.input} | {v.name for v in graph.output}
        assert config["search"]["past_present_share_buffer"] is (target is Target.ORT)
        assert decoder["filename"] == MODEL_FILE and config["model"]["type"] == "mistral"


def corpus_sample() -> list[str]:
    """Every third corpus line, cut at 1000 characters (the SOTU lines are whole speeches), one speech
    of over 20000 characters in full (a long text through genai's tokenizer), and the edge cases."""
    lines = [line for path in CORPORA for line in path.read_text(encoding="utf-8").split("\n")]
    return [line[:1000] for line in lines[::3]] + [next(x for x in lines if len(x) > 20000)] + EDGE_CASES


def test_tokenizer_json_encodes_like_sentencepiece(exports: dict[tuple[str, Target], Path]) -> None:
    """On the corpus sample: the same ids from sentencepiece, from the tokenizers library, from genai's
    tokenizer and from transformers' AutoTokenizer, and decoding gives the text back."""
    folder = exports[("fp32", Target.ORT)]
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    fast = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_JSON))
    genai = og.Tokenizer(og.Model(str(folder)))
    texts = corpus_sample()
    expected = [sp.encode(text) for text in texts]
    fast_ids = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    assert [t for t, a, b in zip(texts, expected, fast_ids, strict=True) if a != b] == []
    # genai's C API stops at a NUL character; none is in this sample
    assert [t for t, ids in zip(texts, expected, strict=True) if genai.encode(t).tolist() != ids] == []
    assert [t for t, ids in zip(texts, expected, strict=True) if fast.decode(ids) != t] == []
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))  # reads tokenizer_config.json's class
    auto_ids = auto(texts, add_special_tokens=False).input_ids
    assert [t for t, a, b in zip(texts, expected, auto_ids, strict=True) if a != b] == []
    assert fast.encode("Hello").ids == [1, *sp.encode("Hello")]  # BOS from the post-processor
    # Written special tokens are special, as in Hugging Face's Mixtral tokenizer.json (sentencepiece spells them)
    assert fast.encode("<s>[INST]", add_special_tokens=False).ids == [1, *sp.encode("[INST]")]


def test_files_beside_the_graph(tmp_path: Path) -> None:
    """A folder without tokenizer.model gets genai_config.json alone; tokenizer files already there
    (copied from the variant) are kept."""
    cfg = replace(SMALL_MIXTRAL, vocab_size=32000)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert write_genai_files(cfg, bare, Target.ORT) == [bare / GENAI_CONFIG]
    assert json.loads((bare / GENAI_CONFIG).read_text()) == genai_config(cfg, Target.ORT)

    own = tmp_path / "own"
    own.mkdir()
    shutil.copyfile(TINY_ASSET / "tokenizer.model", own / "tokenizer.model")
    (own / TOKENIZER_JSON).write_text('{"own": true}')
    assert write_genai_files(cfg, own, Target.STANDARD) == [own / GENAI_CONFIG, own / TOKENIZER_CONFIG]
    assert (own / TOKENIZER_JSON).read_text() == '{"own": true}'
    assert json.loads((own / TOKENIZER_CONFIG).read_text())["add_bos_token"] is True


def test_other_sentencepiece_kinds_are_refused(tmp_path: Path) -> None:
    """A model this builder would not reproduce exactly (here: no dummy prefix) fails by name."""
    proto = sp_pb.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString((TINY_ASSET / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    path = tmp_path / "tokenizer.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(MixtralQuantError, match="add_dummy_prefix"):
        read_sentencepiece(path)
    path.write_bytes(b"not a model")
    with pytest.raises(MixtralQuantError, match="not a sentencepiece model"):
        read_sentencepiece(path)
