"""Python side of the data benchmark: batch-encodes a JSONL corpus with `tokenizers`.

Usage: python_encode.py TOKENIZER_JSON CORPUS_JSONL TEXT_FIELD REPEATS
Prints one JSON line: best wall times of `encode_batch` and `encode_batch_fast` (no
offsets; what rsdeep calls), total ids and utf-8 bytes.
"""
import json
import sys
import time

from tokenizers import Tokenizer


def main():
    tokenizer_json, corpus, field, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)[field] for line in f if line.strip()]
    tok = Tokenizer.from_file(tokenizer_json)
    timings = {}
    for name in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tok, name)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            encodings = encode(texts, add_special_tokens=False)
            best = min(best, time.perf_counter() - start)
        timings[name] = best
        tokens = sum(len(e.ids) for e in encodings)
    size = sum(len(t.encode("utf-8")) for t in texts)
    print(json.dumps({"seconds": timings, "tokens": tokens, "bytes": size}))


if __name__ == "__main__":
    main()
