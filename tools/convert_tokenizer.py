"""
Write tokenizer.json next to a sentencepiece tokenizer.model, once, so that hf.load_tokenizer can read it
with the `tokenizers` library alone. LLaMA-MoE (model_type llama_moe) ships only LLaMA-2's tokenizer.model.

    pip install transformers sentencepiece protobuf   # this script only; drlora itself needs none of them
    python tools/convert_tokenizer.py ~/.cache/huggingface/hub/models--llama-moe--LLaMA-MoE-v1-3_5B-2_8/snapshots/*/

The conversion is transformers' own (the LlamaTokenizerFast that the published model card loads, 4.x or 5.x),
with the folder's tokenizer_config.json settings when there is one; the script then checks that the new file encodes a
few strings exactly as sentencepiece does, and refuses to write it otherwise.
"""
import argparse
import os
import sys

CHECK = ["Suzhou is famous of its gardens.", "  two leading spaces,  two inside", "digits 2024 and 7",
         "non-ASCII: café, 東京, 🙂", "line one\nline two"]


def convert(folder: str) -> str:
    model_file = os.path.join(folder, "tokenizer.model")
    if not os.path.exists(model_file):
        raise FileNotFoundError(f"{model_file} does not exist: nothing to convert")
    try:
        import sentencepiece as spm
        from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
        from transformers import LlamaTokenizerFast
    except ImportError as e:
        raise ImportError(f"{e}; this script needs `pip install transformers sentencepiece protobuf`") from e
    tok = LlamaTokenizerFast.from_pretrained(folder)  # with the folder's tokenizer_config.json, if any
    out = os.path.join(folder, "tokenizer.json")
    tmp = out + ".tmp"
    backend = tok.backend_tokenizer
    # sentencepiece puts its dummy prefix before every text, even one that starts with a space; tokenizers'
    # Metaspace skips a text that already starts with one (transformers 5 converts to it, and "  x" then loses
    # a space). So the prefix is a normaliser, as in transformers 4's legacy conversion, and Metaspace is a no-op.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    sp = spm.SentencePieceProcessor(model_file=model_file)
    bos = sp.id_to_piece(sp.bos_id())  # LLaMA's convention, whatever the transformers version: <s> first, no eos
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, sp.bos_id())])
    backend.save(tmp)
    fast = Tokenizer.from_file(tmp)
    for text in CHECK:
        want, got = sp.encode(text), fast.encode(text, add_special_tokens=False).ids
        if got != want:
            os.remove(tmp)
            raise ValueError(f"{model_file}: the converted tokenizer encodes {text!r} as {got}, "
                             f"sentencepiece as {want}")
    os.replace(tmp, out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="checkpoint folder holding tokenizer.model")
    args = ap.parse_args()
    try:
        print(f"wrote {convert(args.folder)}")
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
