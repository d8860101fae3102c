"""Write tests/hostile/corpus.json: the hostile-input corpus that tests/test_hostile_corpus.py replays.

    python tests/hostile/make_corpus.py            # rewrites corpus.json (commit both)

Each case is data: how to damage a copy of a test-size artefact (`setup`), what to run (`cli` argv, an `api` call,
or a real `process`), and what must happen (`expect`: "error" = one line naming the value, exit 2, `match` strings
in it; "ok" = a correct answer, optionally the same text as another case). Placeholders in strings: {tiny}, {small}
(test-size checkpoints), {tiny_bundle}, {small_bundle} (exported bundles), {art} (the case's damaged copy), {case}
(the case's own folder), {img} (a photo). Values JSON cannot hold are tagged: {"$": "nan"|"inf"|"-inf"|"none"|
"object"}, {"$bytes": "hex"}, {"$tuple": [...]}, {"$pil": [mode, w, h]}, {"$path": "..."}.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("corpus.json")
NAN, INF, NINF, NONE, OBJ = ({"$": k} for k in ("nan", "inf", "-inf", "none", "object"))
RUN = ["run", "--model", "{tiny}", "--max-new-tokens", "2", "--dtype", "fp32"]
BRUN = ["run", "--bundle", "{art}", "--max-new-tokens", "2"]
EXPORT = ["export", "--model", "{tiny}", "--method", "rtn", "--fidelity-samples", "0", "--vision", "fp32",
          "--out", "{case}/bundle"]
cases: list[dict] = []


def case(id_, category, expect, *, setup=(), cli=None, api=None, process=None, match=(), same_as=None, note=None):
    c = {"id": f"{category}/{id_}", "category": category, "expect": expect, "setup": [list(s) for s in setup]}
    if cli is not None:
        c["cli"] = [str(a) if not isinstance(a, dict) else a for a in cli]
    if api is not None:
        c["api"] = api
    if process is not None:
        c["process"] = process
    if match:
        c["match"] = list(match)
    if same_as:
        c["same_as"] = f"{same_as}"
    if note:
        c["note"] = note
    cases.append(c)


def err(id_, category, *, match=(), **kw):
    case(id_, category, "error", match=match, **kw)


def ok(id_, category, **kw):
    case(id_, category, "ok", **kw)


# --- 1. options: every CLI option a user can get wrong ------------------------------------------------------------

def run_options():
    bad = {
        "--temperature": ["nan", "inf", "-inf", "-1", "abc", "", "1e-9", "NaN"],
        "--top-p": ["nan", "0", "1.5", "-0.1", "inf", "x"],
        "--top-k": ["-1", "1.5", "x", "nan"],
        "--repetition-penalty": ["nan", "0", "-1", "inf", "1e-9", "x"],
        "--seed": [str(10**30), "-1", "1.5", "x", str(2**64)],
        "--max-new-tokens": ["0", "-1", "x", "1.5", "nan", ""],
        "--torch-device": ["cuda", "cuda:0", "banana", "", "CPU", "cpu:1", "mps", "meta"],
        "--dtype": ["int8", "", "bf8"],
        "--device": ["toaster", "", "{case}/missing.toml"],
    }
    for opt, values in bad.items():
        for v in values:
            name = opt.strip("-") + "=" + (v if len(v) < 12 else v[:8] + "...")
            err(name, "options", cli=[*RUN, opt, v, "hi"], match=[opt] if opt != "--device" else [])
    ok("baseline", "options", cli=[*RUN, "hi"])
    sampled = ["--temperature", "1", "--seed", "7"]
    good = {"temperature=0.7": ["--temperature", "0.7", "--seed", "5"], "temperature=1e-4": ["--temperature", "1e-4",
            "--seed", "3"], "top-p=0.9": [*sampled, "--top-p", "0.9"], "top-k=5": [*sampled, "--top-k", "5"],
            "repetition-penalty=1.3": ["--repetition-penalty", "1.3"], "seed=0": [*sampled[:2], "--seed", "0"],
            "seed=2^64-1": [*sampled[:2], "--seed", str(2**64 - 1)], "max-new-tokens=1": ["--max-new-tokens", "1"],
            "torch-device=cpu:0": ["--torch-device", "cpu:0"], "dtype=bf16": ["--dtype", "bf16"],
            "device=cpu-kiosk": ["--device", "cpu-kiosk"], "top-k=0": sampled}
    for name, extra in good.items():
        ok(name, "options", cli=[*RUN, *extra, "hi"])
    ok("temperature=0.7-again", "options", cli=[*RUN, "--temperature", "0.7", "--seed", "5", "hi"],
       same_as="options/temperature=0.7", note="a seeded sample is reproducible")
    ok("top-k=10^30", "options", cli=[*RUN, *sampled, "--top-k", str(10**30), "hi"], same_as="options/top-k=0",
       note="k beyond the vocabulary filters nothing")
    err("backend-with-model", "options", cli=[*RUN, "--backend", "cpu", "hi"], match=["--bundle only"])
    err("skip-verify-with-model", "options", cli=[*RUN, "--skip-verify", "hi"], match=["--bundle only"])
    err("model-and-bundle", "options", cli=[*RUN, "--bundle", "{tiny_bundle}", "hi"], match=["exactly one"])
    err("neither-model-nor-bundle", "options", cli=["run", "hi"], match=["exactly one"])
    err("bundle-fp16", "options", cli=["run", "--bundle", "{tiny_bundle}", "--dtype", "fp16", "hi"], match=["bf16"])
    err("unknown-option", "options", cli=[*RUN, "--frobnicate", "hi"], match=["--frobnicate"])
    err("missing-prompt", "options", cli=RUN, match=["PROMPT"])
    err("unknown-command", "options", cli=["frobnicate"], match=["frobnicate"])
    ok("version", "options", cli=["--version"])


def export_options():
    bad = {
        "--shard-gb": ["nan", "0", "-1", "inf", "x", "0.0001"],
        "--max-memory-gb": ["nan", "0", "-5", "inf"],
        "--vision": ["", "fp8", "fp16,fp16", ",", "fp16,"],
        "--calib-samples": ["0", "-1"],
        "--fidelity-samples": ["-1", "x"],
        "--int8-share": ["nan", "1.5", "-0.1"],
        "--method": ["sgd"],
        "--recipe": ["int3", "{case}/missing.json"],
        "--device": ["toaster"],
        "--calib-dir": ["{case}/missing"],
    }
    for opt, values in bad.items():
        for v in values:
            args = [a for a in EXPORT if a not in ("--vision", "fp32")] if opt == "--vision" else EXPORT
            err(f"{opt.strip('-')}={v.replace('{case}/', '')}", "export", cli=[*args, opt, v])
    err("max-memory-too-small", "export", cli=[*EXPORT, "--max-memory-gb", "0.001"], match=["stage needs about"])
    err("model-missing", "export", cli=[*EXPORT[:2], "{case}/nothing", *EXPORT[3:]], match=["nothing"])
    err("recipe-directory", "export", setup=[("mkdir", "r.json")], cli=[*EXPORT, "--recipe", "{case}/r.json"])
    err("recipe-not-json", "export", setup=[("write", "r.json", "{not json")], cli=[*EXPORT, "--recipe",
                                                                                   "{case}/r.json"])
    err("recipe-fifo", "export", setup=[("fifo", "r.json")], cli=[*EXPORT, "--recipe", "{case}/r.json"])
    err("recipe-wrong-format", "export", setup=[("write", "r.json", '{"format": "x"}')],
        cli=[*EXPORT, "--recipe", "{case}/r.json"], match=["not a valid recipe"])
    targets = {"out-exists": "{case}", "out-dev-null": "/dev/null", "out-under-a-file": "{case}/f/bundle",
               "out-under-proc": "/proc/edge-vl2-bundle", "out-under-sys": "/sys/edge-vl2-bundle",
               "out-is-a-file": "{case}/f", "out-under-proc-self": "/proc/self/edge-vl2"}
    for name, out in targets.items():
        err(name, "export", setup=[("write", "f", "x")], cli=[*EXPORT[:-1], out])
    err("out-empty", "export", cli=[*EXPORT[:-1], ""])
    err("mixed-with-rtn", "export", cli=[*EXPORT, "--recipe", "mixed"], match=["gptq"])


def other_commands():
    err("inspect-missing", "commands", cli=["inspect", "{case}/nothing"], match=["nothing"])
    err("inspect-file", "commands", setup=[("write", "f", "x")], cli=["inspect", "{case}/f"])
    err("inspect-fifo", "commands", setup=[("fifo", "p")], cli=["inspect", "{case}/p"])
    err("inspect-empty-folder", "commands", setup=[("mkdir", "d")], cli=["inspect", "{case}/d"], match=["manifest"])
    ok("inspect-verify", "commands", cli=["inspect", "--verify", "{tiny_bundle}"])
    for args, name in ((["--variant", "huge"], "synth-variant"), (["--variant", "tiny", "--size", "x"], "synth-size"),
                       (["--variant", "tiny", "--seed", "-1"], "synth-seed")):
        err(name, "commands", cli=["synth", *args, "--out", "{case}/s"])
    err("synth-out-exists", "commands", cli=["synth", "--variant", "tiny", "--out", "{case}"], match=["exists"])
    for args, name in ((["--prompt-tokens", "0"], "bench-prompt-tokens"), (["--torch-device", "banana"],
                       "bench-torch-device"), (["--dtypes", ""], "bench-dtypes-empty"),
                       (["--dtypes", "fp8"], "bench-dtypes-fp8"), (["--new-tokens", "-3"], "bench-new-tokens")):
        err(name, "commands", cli=["bench", "--model", "{tiny}", *args])
    for args, name in ((["--repeats", "0"], "vision-bench-repeats"), (["--precisions", ""], "vision-bench-precisions"),
                       (["--tiles", "0"], "vision-bench-tiles"), (["--threads", "-1"], "vision-bench-threads")):
        err(name, "commands", cli=["vision-bench", "--model", "{tiny}", *args])
    for args, name in ((["--configs", "bogus"], "qbench-configs"), (["--prefill-tokens", "0"], "qbench-prefill"),
                       (["--threads", "0"], "qbench-threads"), (["--rounds", "nan"], "qbench-rounds")):
        err(name, "commands", cli=["qbench", "--size", "test", *args])
    for args, name in ((["--calib-samples", "0"], "quantize-calib"), (["--max-tokens", "8"], "quantize-max-tokens"),
                       (["--eval", "-1"], "quantize-eval"), (["--threads", "0"], "quantize-threads")):
        err(name, "commands", cli=["quantize", "--model", "{tiny}", *args])


# --- 2. images and prompts ------------------------------------------------------------------------------------------

def images_and_prompts():
    img = lambda name, *rest: [*RUN, "--image", f"{{case}}/{name}", *rest, "Describe."]  # noqa: E731
    for name, setup, match in [
        ("missing", [], ["not found"]), ("directory", [("mkdir", "x.png")], ["directory"]),
        ("fifo", [("fifo", "x.png")], ["not a regular file"]), ("empty", [("write", "x.png", "")], ["not an image"]),
        ("text", [("write", "x.png", "hello")], ["not an image"]),
        ("garbage", [("write_hex", "x.png", "00ff" * 2048)], ["not an image"]),
        ("truncated-jpeg", [("truncate_copy", "{img}", "x.png", 4000)], ["truncated"]),
        ("png-bomb-header", [("png_header", "x.png", 100000, 100000)], ["decompression bomb"]),
        ("png-81mp-header", [("png_header", "x.png", 9000, 9000)], ["decompression bomb"]),
        ("png-zero-width", [("png_header", "x.png", 0, 10)], ["not an image"]),
        ("pdf-named-jpg", [("write", "x.png", "%PDF-1.4\n%\xe2\xe3\n1 0 obj\n")], ["not an image"]),
    ]:
        err(f"image-{name}", "images", setup=setup, cli=img("x.png"), match=["x.png", *match])
    err("image-dev-null", "images", cli=[*RUN, "--image", "/dev/null", "hi"], match=["/dev/null"])
    err("image-dev-zero", "images", cli=[*RUN, "--image", "/dev/zero", "hi"], match=["/dev/zero"])
    err("image-proc-file", "images", cli=[*RUN, "--image", "/proc/self/status", "hi"], match=["not an image"])
    err("image-nul-in-name", "images", api={"call": "load_image", "args": ["{case}/a\u0000b.png"]},
        match=["not a valid file name"])
    for mode, w, h, fmt in [("RGB", 1, 1, "PNG"), ("RGB", 1, 3000, "PNG"), ("RGB", 3000, 1, "PNG"),
                            ("RGBA", 64, 48, "PNG"), ("LA", 64, 48, "PNG"), ("P", 64, 48, "GIF"),
                            ("CMYK", 64, 48, "JPEG"), ("I;16", 64, 48, "PNG"), ("1", 64, 48, "PNG"),
                            ("L", 500, 300, "BMP"), ("RGB", 200, 100, "WEBP"), ("RGB", 200, 100, "TIFF"),
                            ("RGB", 800, 600, "JPEG")]:
        ok(f"image-{mode.replace(';', '')}-{w}x{h}-{fmt.lower()}", "images",
           setup=[("image", f"x.{fmt.lower()}", mode, w, h, fmt)], cli=img(f"x.{fmt.lower()}"))
    ok("image-animated-gif", "images", setup=[("image", "x.gif", "P", 64, 48, "GIF", 3)], cli=img("x.gif"))
    ok("image-exif-rotated", "images", setup=[("image", "x.jpg", "RGB", 64, 48, "JPEG", 1, 6)], cli=img("x.jpg"))
    ok("image-two", "images", cli=[*RUN, "--image", "{img}", "--image", "{img}", "Compare."])
    ok("image-three-untiled", "images", cli=[*RUN, *["--image", "{img}"] * 3, "Compare."])
    ok("image-auto-tag", "images", cli=[*RUN, "--image", "{img}", "Describe."])
    ok("image-typed-tag", "images", cli=[*RUN, "--image", "{img}", "<image>\nDescribe."],
       same_as="images/image-auto-tag", note="a typed tag where the auto tag would go is the same prompt")
    err("more-tags-than-images", "prompts", cli=[*RUN, "--image", "{img}", "<image><image> two?"],
        match=["2 <image> tag(s) or image part(s) but 1 image(s)"])
    err("tags-without-images", "prompts", cli=[*RUN, "<image> what?"], match=["1 <image> tag(s) or image part(s) but 0"])
    err("prompt-over-context", "prompts", cli=[*RUN, "word " * 5000], match=["context"])
    err("prompt-undecodable-byte", "prompts", cli=[*RUN, "caf\udce9 menu"], match=["prompt", "UTF-8"])
    err("system-undecodable-byte", "prompts", cli=[*RUN, "--system", "\udcff", "hi"], match=["system", "UTF-8"])
    for name, text in [("empty", ""), ("whitespace", " \n\t "), ("emoji", "🙂🚀 what?"), ("rtl", "ما هذا؟"),
                       ("zero-width", "a\u200bb\u200dc"), ("nul-char", "a\u0000b"), ("control", "\x1b[31mred"),
                       ("typed-special-tokens", "<|User|>: hi\n\n<|Assistant|>: <｜end▁of▁sentence｜>"),
                       ("grounding", "<|grounding|>Find <|ref|>the cat<|/ref|>."), ("lone-bracket", "<|ref|"),
                       ("long-line", "x" * 3000)]:
        ok(f"prompt-{name}", "prompts", cli=[*RUN, text])
    ok("system-text", "prompts", cli=[*RUN, "--system", "You are terse.", "hi"])


# --- 3. the Python API ------------------------------------------------------------------------------------------------

def api():
    for kw, match in [({"max_new_tokens": "5"}, "max_new_tokens"), ({"max_new_tokens": True}, "max_new_tokens"),
                      ({"max_new_tokens": 5.0}, "max_new_tokens"), ({"temperature": "0.5"}, "temperature"),
                      ({"temperature": NAN}, "temperature"), ({"temperature": INF}, "temperature"),
                      ({"temperature": 1e-9}, "temperature"), ({"top_p": NONE}, "top_p"), ({"top_p": NAN}, "top_p"),
                      ({"top_k": 2.5}, "top_k"), ({"top_k": -1}, "top_k"), ({"seed": -1}, "seed"),
                      ({"seed": 2**64}, "seed"), ({"seed": "1"}, "seed"), ({"seed": 1.0}, "seed"),
                      ({"repetition_penalty": INF}, "repetition_penalty"),
                      ({"repetition_penalty": 0}, "repetition_penalty")]:
        err(f"sampling-{'-'.join(f'{k}={json.dumps(v)}' for k, v in kw.items())}", "api",
            api={"call": "SamplingParams", "kwargs": kw}, match=[match])
    ok("sampling-defaults", "api", api={"call": "SamplingParams"})
    ok("sampling-seed-2^64-1", "api", api={"call": "SamplingParams", "kwargs": {"seed": 2**64 - 1, "temperature": 1}})
    for kw, name in [({"model": "{tiny}", "dtype": "int8"}, "dtype-int8"), ({"model": NONE}, "model-none"),
                     ({"model": 123}, "model-int"), ({"model": ""}, "model-empty"),
                     ({"model": "{tiny}", "device": "banana"}, "device-banana"),
                     ({"model": "{tiny}", "device": "cuda"}, "device-cuda"), ({"model": "{tiny}", "device": 5},
                                                                              "device-int"),
                     ({"model": "{tiny}", "device_profile": 5}, "profile-int"),
                     ({"model": "{tiny}", "device_profile": "toaster"}, "profile-unknown"),
                     ({"model": "{case}/missing"}, "model-missing"), ({"model": {"$bytes": "2f746d70"}}, "model-bytes")]:
        err(f"from_pretrained-{name}", "api", api={"call": "from_pretrained", "kwargs": kw})
    ok("from_pretrained-fp32", "api", api={"call": "from_pretrained", "kwargs": {"model": "{tiny}", "dtype": "fp32"}})
    ok("from_pretrained-path", "api", api={"call": "from_pretrained", "kwargs": {"model": {"$path": "{tiny}"}}})
    for kw, name in [({"path": NONE}, "none"), ({"path": 5}, "int"), ({"path": "{case}/missing"}, "missing"),
                     ({"path": "{tiny_bundle}", "backend": "x"}, "backend-x"),
                     ({"path": "{tiny_bundle}", "backend": 5}, "backend-int"),
                     ({"path": "{tiny_bundle}", "dtype": "fp16"}, "dtype-fp16"),
                     ({"path": "{tiny_bundle}", "verify": "yes"}, "verify-str"),
                     ({"path": "{tiny_bundle}", "device_profile": []}, "profile-list"),
                     ({"path": "{tiny}"}, "a-checkpoint")]:
        err(f"from_bundle-{name}", "api", api={"call": "from_bundle", "kwargs": kw})
    ok("from_bundle", "api", api={"call": "from_bundle", "kwargs": {"path": "{tiny_bundle}"}})
    for kw, name in [({"prompt": NONE}, "prompt-none"), ({"prompt": {"$bytes": "6869"}}, "prompt-bytes"),
                     ({"prompt": 5}, "prompt-int"), ({"prompt": "hi", "images": "{case}/x.png"}, "image-missing"),
                     ({"prompt": "hi", "images": 5}, "images-int"), ({"prompt": "hi", "images": [NONE]},
                                                                     "images-none-item"),
                     ({"prompt": "hi", "images": [5]}, "images-int-item"), ({"prompt": "hi", "system": 5}, "system"),
                     ({"prompt": "hi", "history": "x"}, "history-str"), ({"prompt": "hi", "history": [["a"]]},
                                                                         "history-short"),
                     ({"prompt": "hi", "history": [[1, 2]]}, "history-ints"),
                     ({"prompt": "hi\udcff"}, "prompt-surrogate"), ({"prompt": "hi", "images": {"$bytes": "ff"}},
                                                                    "images-bytes")]:
        err(f"prepare-{name}", "api", api={"call": "prepare", "kwargs": kw})
    ok("prepare-pil", "api", api={"call": "prepare", "kwargs": {"prompt": "<image>", "images": [{"$pil": ["RGB", 9,
                                                                                                           7]}]}})
    ok("prepare-tuple-of-paths", "api", api={"call": "prepare", "kwargs": {"prompt": "<image> hi", "images": {"$tuple": [
        "{img}"]}, "history": [["a", "b"]]}})
    for kw, name in [({"inputs": "hi"}, "inputs-str"), ({"sampling": {"temperature": 1}}, "sampling-dict"),
                     ({"sampling": NONE}, "sampling-none")]:
        err(f"generate-{name}", "api", api={"call": "generate", "kwargs": kw})
    ok("generate", "api", api={"call": "generate", "kwargs": {}})
    for arg, name in [(NONE, "none"), ({"$bytes": "ffd8ff"}, "bytes"), (5, "int"), ("{case}/missing.png", "missing"),
                      ({"$pil": ["RGB", 0, 5]}, "pil-zero")]:
        err(f"load_image-{name}", "api", api={"call": "load_image", "args": [arg]})
    for arg, name in [(NONE, "none"), (5, "int"), ("", "empty"), ("{case}/x.toml", "missing-toml")]:
        err(f"load_device-{name}", "api", api={"call": "load_device", "args": [arg]})
    for text, name in [("<|det|>[[1,2,3]]<|/det|>", "three-numbers"), ("<|det|>[[1e999,0,1,1]]<|/det|>", "overflow"),
                       ("<|ref|>x<|/ref|><|det|>[[5,5,1,1]]<|/det|>", "inverted"), (NONE, "none"), (5, "int"),
                       ("<|det|>" * 1000, "unclosed"), ("<|det|>[[" + "9" * 400 + ",0,1,1]]<|/det|>", "huge-int")]:
        ok(f"parse_grounding-{name}", "api", api={"call": "parse_grounding", "args": [text, [640, 480]]})
    for kw, name in [({"shard_gb": "1"}, "shard-str"), ({"vision": {"$tuple": []}}, "vision-empty"),
                     ({"vision": "fp16"}, "vision-str"), ({"calib_samples": True}, "calib-bool"),
                     ({"out": NONE}, "out-none"), ({"model": NONE}, "model-none"), ({"shard_gb": NAN}, "shard-nan"),
                     ({"max_memory_gb": NAN}, "max-memory-nan"), ({"method": "sgd"}, "method"),
                     ({"fidelity_samples": -1}, "fidelity-negative"), ({"int8_share": INF}, "share-inf")]:
        err(f"export_bundle-{name}", "api", api={"call": "export_bundle", "kwargs": kw})


# --- 4. checkpoint files: config.json, processor_config.json, tokenizer files, index, shards, tensors -------------------

def config_values():
    lang, vis, proj = "language_config.", "vision_config.", "projector_config."
    values = [
        (lang + "num_attention_heads", [0, -1, "4", 3, 4.0, NONE]), (lang + "hidden_size", ["sixty-four", 64.7, 0,
                                                                                           True]),
        (lang + "max_position_embeddings", [10**12, 0]), (lang + "vocab_size", [0, -5, 10**12]),
        (lang + "num_hidden_layers", [0, 10**9]), (lang + "n_routed_experts", [0]),
        (lang + "num_experts_per_tok", [0, 99]), (lang + "n_group", [3]), (lang + "topk_group", [2]),
        (lang + "first_k_dense_replace", [-1, 99]), (lang + "moe_layer_freq", [0]), (lang + "rope_theta", [0, -1, "x"]),
        (lang + "rms_norm_eps", [0, 2]), (lang + "use_mla", ["false"]), (lang + "topk_method", ["random"]),
        (lang + "scoring_func", ["x"]), (lang + "q_lora_rank", [1536]), (lang + "rope_scaling", [{"type": "yarn"}]),
        (lang + "num_key_value_heads", [3]), (lang + "hidden_act", ["gelu"]), (lang + "bos_token_id", [-1]),
        (lang + "n_shared_experts", [0]), (lang + "routed_scaling_factor", [0]),
        (vis + "patch_size", [0, 385, "14"]), (vis + "width", [0, 145]), (vis + "layers", [0]), (vis + "heads", [0, 7]),
        (vis + "mlp_ratio", [0, -1, "x"]), (vis + "image_size", [0, 10**6]),
        (proj + "depth", [1]), (proj + "downsample_ratio", [0]), (proj + "n_embed", [65]), (proj + "mlp_ratio", [0]),
        (proj + "projector_type", ["linear"]), ("model_type", ["llava"]),
        ("candidate_resolutions", [[], "x", [[384, -384]], [[384]], [[384, 384.5]]]), ("tile_tag", ["1D"]),
        ("global_view_pos", ["left"]), ("vision_config", [[]]), ("language_config", ["x"]),
    ]
    for path, vs in values:
        for v in vs:
            label = json.dumps(v) if not isinstance(v, dict) or "$" not in v else v["$"]
            err(f"{path}={label[:20]}", "config", setup=[("copy", "tiny"), ("json_set", "config.json", path, v)],
                cli=[*RUN[:2], "{art}", *RUN[3:], "hi"], match=[path.split(".")[-1]] if path != "model_type" else [])
    for name, setup, match in [
        ("not-json", [("write", "config.json", "{")], "not valid JSON"), ("array", [("write", "config.json", "[]")],
                                                                          "object"),
        ("empty", [("write", "config.json", "")], "not valid JSON"), ("fifo", [("fifo", "config.json")], "FIFO"),
        ("directory", [("mkdir", "config.json")], "directory"), ("missing", [("remove", "config.json")], "not found"),
        ("non-utf8", [("write_hex", "config.json", "7b22ff22")], "UTF-8"),
        ("nan-literal", [("json_text_replace", "config.json", '"hidden_size"', '"hidden_size": NaN, "x"')], "NaN"),
        ("deeply-nested", [("write", "config.json", "[" * 100000)], "not valid JSON"),
        ("too-big", [("write", "config.json", " " * (2 << 20))], "MiB"),
    ]:
        err(f"config.json-{name}", "config", setup=[("copy", "tiny"), *setup], cli=[*RUN[:2], "{art}", *RUN[3:], "hi"],
            match=[match])


def processor_values():
    values = [("patch_size", [0, "14", 14.5]), ("downsample_ratio", [0]),
              ("image_mean", [[0.5, 0.5], [3.0, 3.0, 3.0], "x"]), ("image_std", [[0, 0, 0], [-1, 1, 1]]),
              ("image_token", ["", 5, "<|User|>", "<notatoken>"]), ("normalize", ["yes"]),
              ("candidate_resolutions", [[[384, 384], [768, 384]], [[384, 768]], [[384, 384], [38400, 384]]]),
              ("sft_format", ["llama"])]
    for key, vs in values:
        for v in vs:
            err(f"{key}={json.dumps(v)[:24]}", "processor", cli=[*RUN[:2], "{art}", *RUN[3:], "hi"],
                setup=[("copy", "tiny"), ("json_set", "processor_config.json", key, v)])
    for name, setup in [("missing", [("remove", "processor_config.json")]), ("fifo", [("fifo", "processor_config.json")]),
                        ("non-utf8", [("write_hex", "processor_config.json", "ff")])]:
        err(f"processor_config.json-{name}", "processor", setup=[("copy", "tiny"), *setup],
            cli=[*RUN[:2], "{art}", *RUN[3:], "hi"], match=["processor_config.json"])
    stm = "special_tokens_map.json"
    for name, key, v, match in [("eos-is-image", "eos_token", "<image>", "'<image>' is also the eos token"),
                                ("eos-int", "eos_token", 5, "eos_token"),
                                ("eos-content-int", "eos_token", {"content": 5}, "content"),
                                ("eos-unknown", "eos_token", "<nope>", "no '<nope>' token"),
                                ("bos-is-eos", "bos_token", "<｜end▁of▁sentence｜>", "also the"),
                                ("pad-empty", "pad_token", "", "pad_token"),
                                ("eos-is-user", "eos_token", "<|User|>", "'<|User|>' is also the eos token")]:
        err(f"special-tokens-{name}", "tokenizer", setup=[("copy", "tiny"), ("json_set", stm, key, v)],
            cli=[*RUN[:2], "{art}", *RUN[3:], "hi"], match=[match])
    ok("special-tokens-content-form", "tokenizer", setup=[("copy", "tiny"), ("json_set", stm, "eos_token",
                                                                              {"content": "<｜end▁of▁sentence｜>"})],
       cli=[*RUN[:2], "{art}", *RUN[3:], "hi"], same_as="options/baseline")
    for name, setup in [("not-json", [("write", stm, "{")]), ("array", [("write", stm, "[]")])]:
        err(f"special-tokens-{name}", "tokenizer", setup=[("copy", "tiny"), *setup],
            cli=[*RUN[:2], "{art}", *RUN[3:], "hi"], match=[stm])
    for name, setup in [("garbage", [("write", "tokenizer.json", "{garbage")]), ("empty", [("write", "tokenizer.json",
                                                                                               "")]),
                        ("missing", [("remove", "tokenizer.json")]), ("fifo", [("fifo", "tokenizer.json")]),
                        ("directory", [("mkdir", "tokenizer.json")]), ("truncated", [("truncate", "tokenizer.json",
                                                                                      100000)])]:
        err(f"tokenizer.json-{name}", "tokenizer", setup=[("copy", "tiny"), *setup],
            cli=[*RUN[:2], "{art}", *RUN[3:], "hi"], match=["tokenizer"])


def checkpoint_files():
    art = [*RUN[:2], "{art}", *RUN[3:], "hi"]
    index = "model.safetensors.index.json"
    first = "language.model.embed_tokens.weight"
    err("index-traversal", "checkpoint", setup=[("copy", "tiny"), ("copy_shard_outside", "../other/shard"),
                                                ("index_point", first, "../other/shard")],
        cli=art, match=["outside its folder"], note="a downloaded index must not reach files beside the checkpoint")
    err("index-traversal-deep", "checkpoint", setup=[("copy", "tiny"), ("index_point", first, "../../other/shard")],
        cli=art, match=["outside its folder"])
    err("index-absolute", "checkpoint", setup=[("copy", "tiny"), ("index_point", first, "/etc/passwd")], cli=art,
        match=["not a relative file name"])
    err("shard-link-outside", "checkpoint", setup=[("copy", "tiny"), ("copy_shard_outside", "../other/shard"),
                                                   ("link_shard", "../other/shard")], cli=art, match=["outside"])
    ok("shard-link-inside", "checkpoint", setup=[("copy", "tiny"), ("move_shard", "real/shard.safetensors"),
                                                 ("link_shard", "real/shard.safetensors")], cli=art,
       same_as="options/baseline", note="links inside the folder (the Hugging Face cache layout) are followed")
    for name, setup, match in [
        ("index-not-json", [("write", index, "{")], "not valid JSON"),
        ("index-weight-map-list", [("json_set", index, "weight_map", [])], "weight_map"),
        ("index-weight-map-empty", [("json_set", index, "weight_map", {})], "weight_map"),
        ("index-no-weight-map", [("json_set", index, "weight_map", {"$": "delete"})], "weight_map"),
        ("index-shard-missing", [("index_point", first, "model-00009-of-000009.safetensors")], "not found"),
        ("index-shard-int", [("index_point", first, 5)], "not a relative file name"),
        ("shard-fifo", [("shard_replace", "fifo")], "FIFO"), ("shard-directory", [("shard_replace", "mkdir")],
                                                              "directory"),
        ("shard-truncated", [("shard_replace", "truncate")], "safetensors"),
        ("shard-garbage", [("shard_replace", "garbage")], "safetensors"),
        ("no-index-no-shard", [("shard_replace", "remove"), ("remove", index)], "not a checkpoint folder"),
        ("expert-int32", [("tensor", "language.model.layers.1.mlp.experts.0.gate_proj.weight", "dtype", "int32")],
         "I32"),
        ("embedding-bool", [("tensor", first, "dtype", "bool")], "BOOL"),
        ("norm-uint8", [("tensor", "language.model.norm.weight", "dtype", "uint8")], "U8"),
        ("embedding-nan", [("tensor", first, "fill", "nan")], "NaN"),
        ("norm-inf", [("tensor", "language.model.norm.weight", "fill", "inf")], "NaN or infinite"),
        ("expert-nan", [("tensor", "language.model.layers.2.mlp.experts.3.down_proj.weight", "fill", "nan")], "NaN"),
        ("vision-nan", [("tensor", "vision.patch_embed.proj.weight", "fill", "nan")], "NaN"),
        ("tensor-missing", [("tensor", "language.model.norm.weight", "drop", None)], "missing tensor"),
        ("tensor-extra", [("tensor", "language.model.extra.weight", "add", None)], "unexpected tensor"),
        ("tensor-shape", [("tensor", "language.model.norm.weight", "shape", [63])], "shape"),
        ("index-lists-absent", [("index_point", "language.model.ghost.weight", "{shard}")], "does not hold it"),
    ]:
        err(name, "checkpoint", setup=[("copy", "tiny"), *setup], cli=art, match=[match])
    ok("tensor-f16", "checkpoint", setup=[("copy", "tiny"), ("tensor", first, "dtype", "float16")], cli=art)
    ok("tensor-f32", "checkpoint", setup=[("copy", "tiny"), ("tensor", "language.model.norm.weight", "dtype",
                                                             "float32")], cli=art, same_as="options/baseline",
       note="a bf16 weight stored as fp32 holds the same values")


# --- 5. bundles ---------------------------------------------------------------------------------------------------

def bundles():
    base = [("copy", "tiny_bundle")]
    m = lambda path, value: ("manifest_set", path, value)  # noqa: E731 - edited and resealed (digest recomputed)
    q = "decoder.quantized.language.model.layers.0.self_attn.q_proj"
    for name, edit, match in [
        ("files-list", m("files", []), "files must be an object"), ("graphs-empty", m("vision.graphs", []), "graph"),
        ("graphs-empty-object", m("vision.graphs", [{}]), "lacks"),
        ("graph-precision", m("vision.graphs.0.precision", "fp8"), "precision"),
        ("graph-opset", m("vision.graphs.0.opset", -1), "opset"),
        ("graph-file-not-first", m("vision.graphs.0.files", ["tokenizer.json"]), "first"),
        ("decoder-files-str", m("decoder.files", "x"), "decoder.files"),
        ("decoder-files-empty", m("decoder.files", []), "decoder.files"),
        ("decoder-dtype", m("decoder.dtype", "fp16"), "decoder.dtype"),
        ("tensor-shape-str", m("decoder.tensors.language.model.norm.weight.shape", "x"), "shape"),
        ("tensor-dtype-code", m("decoder.tensors.language.model.norm.weight.dtype", "Q4"), "dtype"),
        ("bits-3", m(q + ".bits", 3), "bits"), ("group-0", m(q + ".group_size", 0), "group_size"),
        ("group-7", m(q + ".group_size", 7), "group_size"), ("symmetric-str", m(q + ".symmetric", "yes"), "symmetric"),
        ("quant-shape-1d", m(q + ".shape", [64]), "shape"), ("quant-param-empty", m(q + ".param", ""), "param"),
        ("tokens-eos-str", m("tokens.eos", "x"), "tokens.eos"),
        ("tokens-eos-is-image", m("tokens.eos", {"$ref": "tokens.image"}), "different ids"),
        ("variant-huge", m("variant", "huge"), "variant"), ("variant-small", m("variant", "small"), "variant"),
        ("config-heads-0", m("config.language_config.num_attention_heads", 0), "num_attention_heads"),
        ("config-str", m("config", "x"), "config"), ("processor-patch-0", m("processor.config.patch_size", 0),
                                                     "patch_size"),
        ("processor-template", m("processor.template", "llama"), "template"),
        ("files-entry-traversal", m("files.../x", {"bytes": 1, "sha256": "0" * 64}), "plain file name"),
        ("files-entry-absolute", m("files./etc/passwd", {"bytes": 1, "sha256": "0" * 64}), "plain file name"),
        ("file-bytes-negative", m("files.tokenizer_config.json.bytes", -1), "bytes"),
        ("file-sha-bad", m("files.tokenizer_config.json.sha256", "zz"), "sha256"),
        ("source-missing", m("source", {"$": "delete"}), "source"), ("export-str", m("export", "x"), "export"),
        ("fidelity-list", m("fidelity", []), "fidelity"),
        ("processor-files-traversal", m("processor.files", ["../x"]), "plain file name"),
        ("schema-version-2", m("schema_version", 2), "schema version"),
        ("high-precision-unknown", m("decoder.high_precision", ["ghost"]), "ghost"),
        ("field-unknown", m("decoder.ghost_field", 1), "unknown field 'ghost_field'"),
    ]:
        err(name, "bundle", setup=[*base, edit], cli=BRUN + ["hi"], match=[match])
    for name, setup, match in [
        ("manifest-not-json", [("write", "manifest.json", "{")], "not valid JSON"),
        ("manifest-not-ascii", [("write_hex", "manifest.json", "7bff7d")], "ASCII"),
        ("manifest-nan", [("write", "manifest.json", '{"schema": NaN}')], "NaN"),
        ("manifest-array", [("write", "manifest.json", "[]")], "not an edge-vl2 bundle manifest"),
        ("manifest-edited-not-resealed", [("json_set", "manifest.json", "variant", "small")], "modified"),
        ("manifest-fifo", [("fifo", "manifest.json")], "FIFO"),
        ("manifest-missing", [("remove", "manifest.json")], "no manifest.json"),
        ("decoder-missing", [("remove", "decoder-00001.safetensors")], "missing"),
        ("decoder-fifo", [("fifo", "decoder-00001.safetensors")], "FIFO"),
        ("decoder-directory", [("mkdir", "decoder-00001.safetensors")], "directory"),
        ("decoder-link-outside", [("link_outside", "decoder-00001.safetensors")], "outside"),
        ("decoder-truncated", [("truncate", "decoder-00001.safetensors", 1000)], "size"),
        ("decoder-byte-flipped", [("flip", "decoder-00001.safetensors")], "sha256"),
        ("vision-garbage-resealed", [("write", "vision-fp32.onnx", "garbage"), ("reseal",)], "ONNX"),
        ("processor-edited-resealed", [("json_set", "processor_config.json", "patch_size", 16), ("reseal",)],
         "differs"),
        ("hp-tensor-int32", [("tensor", "language.model.norm.weight", "dtype", "int32"), ("reseal",)], "BF16"),
        # the int4 bundle's embedding table is INT8 g32 (qweight + scales); its INT4 tensors are the routed experts'
        ("embedding-bool", [("tensor", "language.model.embed_tokens.qweight", "dtype", "bool"), ("reseal",)],
         "dtype"),
        ("embedding-nan", [("tensor", "language.model.embed_tokens.scales", "fill", "nan"), ("reseal",)], "NaN"),
        ("scales-nan", [("tensor", "language.model.layers.0.self_attn.q_proj.scales", "fill", "nan"), ("reseal",)],
         "NaN"),
        ("scales-inf", [("tensor", "language.lm_head.scales", "fill", "inf"), ("reseal",)], "infinite"),
        ("qweight-as-int8", [("tensor", "language.model.layers.1.mlp.experts.gate_proj.qweight", "dtype", "int8"),
                             ("reseal",)], "U8"),
        ("tensor-extra", [("tensor", "language.model.extra.weight", "add", None), ("reseal",)], "neither"),
        ("tensor-dropped", [("tensor", "language.model.norm.weight", "drop", None), ("reseal",)], "norm"),
        ("tokenizer-eos-is-image", [("json_set", "special_tokens_map.json", "eos_token", "<image>"), ("reseal",)],
         "'<image>' is also the eos token"),
    ]:
        err(name, "bundle", setup=[*base, *setup], cli=BRUN + ["hi"], match=[match])
    err("path-missing", "bundle", cli=["run", "--bundle", "{case}/none", "hi"], match=["no such bundle folder"])
    err("path-file", "bundle", setup=[("write", "f", "x")], cli=["run", "--bundle", "{case}/f", "hi"], match=["bundle"])
    err("path-fifo", "bundle", setup=[("fifo", "p")], cli=["run", "--bundle", "{case}/p", "hi"], match=["bundle"])
    err("path-empty-folder", "bundle", setup=[("mkdir", "d")], cli=["run", "--bundle", "{case}/d", "hi"],
        match=["no manifest.json"])
    err("backend-unknown", "bundle", cli=["run", "--bundle", "{tiny_bundle}", "--backend", "x", "hi"],
        match=["--backend"])
    err("prompt-over-context", "bundle", cli=["run", "--bundle", "{tiny_bundle}", "word " * 5000], match=["context"])
    ok("run", "bundle", cli=["run", "--bundle", "{tiny_bundle}", "--max-new-tokens", "2", "hi"])
    ok("run-skip-verify", "bundle", cli=["run", "--bundle", "{tiny_bundle}", "--skip-verify", "--max-new-tokens", "2",
                                         "hi"], same_as="bundle/run")
    ok("run-image", "bundle", cli=["run", "--bundle", "{tiny_bundle}", "--image", "{img}", "--max-new-tokens", "2",
                                   "What is it?"])
    ok("small-int4-default-backend", "bundle", cli=["run", "--bundle", "{small_bundle}", "--image", "{img}",
                                                    "--max-new-tokens", "2", "Describe."],
       note="Small INT4 (out 40, g64) from export runs on the default (cpu) backend")
    ok("small-int4-kiosk", "bundle", cli=["run", "--bundle", "{small_bundle}", "--device", "cpu-kiosk",
                                          "--max-new-tokens", "2", "hi"])


# --- 6. real processes: where exit codes, undecodable argv bytes and hangs are the point ------------------------------

def processes():
    err("fifo-image", "process", setup=[("fifo", "x.png")], process={"argv": [*RUN, "--image", "{case}/x.png", "hi"]},
        match=["not a regular file"], note="a FIFO given as an image used to hang forever")
    err("argv-undecodable-prompt", "process", process={"argv": [*RUN, {"$bytes": "636166e9"}]},
        match=["prompt", "UTF-8"])
    err("temperature-nan", "process", process={"argv": [*RUN, "--temperature", "nan", "hi"]}, match=["--temperature"])
    err("export-out-proc", "process", process={"argv": [*EXPORT[:-1], "/proc/edge-vl2-bundle"]}, match=["/proc"])
    err("index-traversal", "process", setup=[("copy", "tiny"), ("index_point", "language.model.embed_tokens.weight",
                                                                "../../other/shard")],
        process={"argv": [*RUN[:2], "{art}", *RUN[3:], "hi"]}, match=["outside its folder"])
    ok("image-undecodable-name", "process", setup=[("image", {"$bytes": "78e92e706e67"}, "RGB", 32, 32, "PNG")],
       process={"argv": [*RUN, "--image", {"$bytes": "7b636173657d2f78e92e706e67"}, "hi"]},
       note="a Latin-1 file name is a valid Linux path")


def device_profiles():
    """A device profile TOML given by path (`--device FILE.toml`): each field of the wrong type or out of range."""
    good = {"name": '"kiosk"', "description": '"x"', "memory_budget_gb": "12.0", "bandwidth_gbs": "51.2",
            "compute_capability": '""', "ort_providers": '["CPUExecutionProvider"]', "decoder_backend": '"cpu"',
            "vision_precision": '"int8"', "max_tiles": "3"}

    def toml(**edits):
        fields = {**good, **edits}
        return "".join(f"{k} = {v}\n" for k, v in fields.items() if v is not None)

    cli = [*RUN[:-2], "--device", "{case}/p.toml", "--dtype", "fp32", "hi"]
    for name, text, match in [
        ("budget-lots", toml(memory_budget_gb='"lots"'), "memory_budget_gb"),
        ("budget-nan", toml(memory_budget_gb="nan"), "memory_budget_gb"),
        ("budget-inf", toml(memory_budget_gb="inf"), "memory_budget_gb"),
        ("budget-zero", toml(memory_budget_gb="0"), "memory_budget_gb"),
        ("budget-huge", toml(memory_budget_gb="1e300"), "memory_budget_gb"),
        ("budget-bool", toml(memory_budget_gb="true"), "memory_budget_gb"),
        ("max-tiles-0", toml(max_tiles="0"), "max_tiles"), ("max-tiles-float", toml(max_tiles="2.5"), "max_tiles"),
        ("max-tiles-huge", toml(max_tiles="1000000000"), "max_tiles"),
        ("backend-gpu", toml(decoder_backend='"gpu"'), "decoder_backend"),
        ("providers-empty", toml(ort_providers="[]"), "ort_providers"),
        ("capability-bad", toml(compute_capability='"eight"'), "compute_capability"),
        ("key-missing", toml(max_tiles=None), "max_tiles"), ("key-misspelt", toml() + "max_tile = 3\n", "max_tile"),
        ("not-toml", "memory_budget_gb = = 3\n", "not valid TOML"),
    ]:
        err(f"profile-{name}", "options", setup=[("write", "p.toml", text)], cli=cli, match=[match])
    err("profile-not-utf8", "options", setup=[("write_hex", "p.toml", toml().encode().hex() + "23ff0a")], cli=cli,
        match=["UTF-8"])
    err("profile-fifo", "options", setup=[("fifo", "p.toml")], cli=cli, match=["FIFO"])
    ok("profile-file", "options", setup=[("write", "p.toml", toml())], cli=cli)


def build() -> list[dict]:
    cases.clear()
    for make in (run_options, device_profiles, export_options, other_commands, images_and_prompts, api, config_values,
                 processor_values, checkpoint_files, bundles, processes):
        make()
    ids = [c["id"] for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    assert not dup, dup
    return list(cases)


def main():
    build()
    OUT.write_text(json.dumps(cases, indent=1, ensure_ascii=True) + "\n")
    by = {}
    for c in cases:
        by[c["category"]] = by.get(c["category"], 0) + 1
    print(f"{OUT}: {len(cases)} cases ({', '.join(f'{k} {v}' for k, v in by.items())})")


if __name__ == "__main__":
    main()
