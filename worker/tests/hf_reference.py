"""Reference side of worker/tests/tokenizer_parity.rs: Python `tokenizers` and
transformers' `AutoTokenizer`, driven by JSON on stdin (one request, or a list of them
answered by a list, so one interpreter start serves a whole test), answering JSON.

Requests:
  {"op": "encode", "tokenizer_json": PATH, "texts": [...]}          -> {"ids": [[...]]}
  {"op": "auto_encode", "dir": DIR, "texts": [...]}                  -> {"ids": [[...]], "eos": ..., "pad": ...}
  {"op": "chat", "dir": DIR, "conversations": [[msg...]], "add_generation_prompt": B}
                                                                     -> {"texts": [...]}
"""
import json
import sys


def main():
    request = json.load(sys.stdin)
    if isinstance(request, list):
        answer = [answer_one(r) for r in request]
    else:
        answer = answer_one(request)
    json.dump(answer, sys.stdout, ensure_ascii=False)


def answer_one(request):
    op = request["op"]
    if op == "encode":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(request["tokenizer_json"])
        encodings = tok.encode_batch(request["texts"], add_special_tokens=False)
        answer = {"ids": [e.ids for e in encodings]}
    elif op == "auto_encode":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(request["dir"])
        ids = [tok(t, add_special_tokens=True)["input_ids"] for t in request["texts"]]
        answer = {"ids": ids, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    elif op == "chat":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(request["dir"])
        texts = [
            tok.apply_chat_template(
                c, tokenize=False, add_generation_prompt=request["add_generation_prompt"]
            )
            for c in request["conversations"]
        ]
        answer = {"texts": texts}
    else:
        raise SystemExit(f"unknown op {op}")
    return answer


if __name__ == "__main__":
    main()
