"""An lm-evaluation-harness model backed by factflip: `--model factflip`.

Owns: `FactflipLM` (lm-eval 0.4's `TemplateLM` over factflip's scorer and generation), its
registration under the name "factflip" (on import), `write_local_task` and `main` (lm-eval's own command line with
the model registered: `factflip lm-eval ...`).
Must not: be imported by the core (it imports lm-eval; the `lm_eval` extra installs it) or
score anything itself (`evals.loglik`, `evals.generation`).

    import factflip.evals.lm_eval
    import lm_eval
    lm_eval.simple_evaluate(model="factflip", model_args="pretrained=DIR,dtype=float32",
                            tasks=["my_task"], task_manager=lm_eval.tasks.TaskManager(
                                include_path="tasks/"))

`pretrained` is any HF or factflip model directory, a training workdir or one of its checkpoint
steps (`factflip.load_model`); `tokenizer` the directory of its tokenizer (default: the
model's own, or a training run's `data.tokenizer_dir`). Requests are tokenised by lm-eval's own `TemplateLM` code with HFLM's `tok_encode`
rules (the tokenizer's special tokens; `add_bos_token` overrides), so the (context,
continuation) token ids are those the `hf` backend scores; inputs longer than the model's
context are cut from the left as `hf` does; `loglikelihood_rolling` uses lm-eval's windows;
`generate_until` follows HFLM (EOS added to the stop strings, contexts cut to leave
`max_gen_toks`, sampling from `seed` when a task asks for it).

`--apply_chat_template` (and `--system_instruction`, `--fewshot_as_multiturn`, a task's
`gen_prefix`) render each request with the tokenizer's own chat template exactly as `hf` does
(`HFLM.apply_chat_template`), so both backends score the same strings; with a GGUF file the
template is the one in its metadata. A tokenizer without a chat template is an error naming the
model. `enable_thinking` / `chat_template_args` are passed to the template as `hf` passes them.
"""

from __future__ import annotations

import logging
import sys

import jax
import jinja2
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from factflip.data.tokenizer import load_tokenizer, model_tokenizer
from factflip.evals import generation, loglik
from factflip.evals.requests import rolling_scores
from factflip.fileio import write_jsonl, write_text
from factflip.models.store import load_model

log = logging.getLogger(__name__)


@register_model("factflip")
class FactflipLM(TemplateLM):
  """lm-eval model arguments: pretrained, tokenizer, dtype (float32 | bfloat16), batch_size,
  max_length (default: the model's context), max_gen_toks (256), add_bos_token, seed,
  enable_thinking=False and chat_template_args (a dict, from Python) for the chat template."""

  def __init__(self, pretrained: str, tokenizer: str | None = None, dtype: str = "float32",
               batch_size: int | str = 64, max_length: int | None = None,
               max_gen_toks: int = 256, add_bos_token: bool | None = None, seed: int = 0,
               enable_thinking: bool | None = None, chat_template_args: dict | None = None,
               device: str | None = None, max_batch_size: int | None = None, **unknown):
    super().__init__()
    if unknown:                      # a misspelt model_args key must not pass silently
      raise ValueError(f"factflip model_args: unknown {sorted(unknown)}; expected pretrained, "
                       "tokenizer, dtype, batch_size, max_length, max_gen_toks, "
                       "add_bos_token, seed, enable_thinking, chat_template_args")
    del device, max_batch_size       # lm-eval passes them; factflip places the model itself
    self.model = load_model(pretrained, dtype=dtype)
    self.tokenizer = load_tokenizer(tokenizer) if tokenizer else model_tokenizer(pretrained)
    self.source = f"{pretrained}" + (f" (tokenizer {tokenizer})" if tokenizer else "")
    self.chat_template_args = _chat_template_args(enable_thinking, chat_template_args)
    self.batch_size = 64 if batch_size in ("auto", None) else int(str(batch_size).split(":")[0])
    self._max_length = int(max_length or self.model.cfg.max_seq_len)
    if self._max_length > self.model.cfg.max_seq_len:
      raise ValueError(f"max_length {self._max_length} is longer than the model's context of "
                       f"{self.model.cfg.max_seq_len}")
    self.max_gen_toks = int(max_gen_toks)
    self.add_bos_token = add_bos_token if not isinstance(add_bos_token, str) else (
        add_bos_token.lower() == "true")
    self.key = jax.random.key(int(seed))
    self.backend = "causal"

  # ---- tokenisation (HFLM's rules) ----------------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    t = self.tokenizer
    return t.bos_token_id if t.bos_token_id is not None else t.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
    flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
    if add_special_tokens is None and string.startswith(  # a chat template's own BOS: not twice
        self.tokenizer.decode(self.prefix_token_id)):
      flag = False
    kwargs = {} if flag is None else {"add_special_tokens": flag}
    return self.tokenizer.encode(string, **kwargs)

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  # ---- chat templates (HFLM's) --------------------------------------------------------------
  @property
  def tokenizer_name(self) -> str:
    """Part of lm-eval's request-cache key: the tokenizer's path, else the model's (a GGUF's
    tokenizer has no path of its own)."""
    return (self.tokenizer.name_or_path or self.source).replace("/", "__")

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    if chat_template:
      self._require_chat_template()
    return super().chat_template(chat_template)

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """`chat_history` rendered by the tokenizer's chat template, as `HFLM` renders it: a
    template that rejects the system role is retried without the system messages."""
    self._require_chat_template()
    def render(messages):
      return self.tokenizer.apply_chat_template(
          messages, tokenize=False, add_generation_prompt=add_generation_prompt,
          continue_final_message=not add_generation_prompt, **self.chat_template_args)
    try:
      return render(chat_history)
    except jinja2.exceptions.TemplateError:
      log.warning("%s: the chat template failed; retrying without the system role",
                  self.source)
      return render([m for m in chat_history if m["role"] != "system"])

  def _require_chat_template(self) -> None:
    if not self.tokenizer.chat_template:
      raise ValueError(f"--apply_chat_template: the tokenizer of {self.source} has no chat "
                       "template (no chat_template in its tokenizer_config.json / "
                       "chat_template.jinja, or tokenizer.chat_template in the GGUF file); "
                       "pass model_args tokenizer=DIR with one, or drop --apply_chat_template")

  # ---- requests -----------------------------------------------------------------------------
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
    L = self.max_length
    pairs = []
    for _, ctx, cont in requests:
      if len(cont) > L:
        raise ValueError(f"a continuation of {len(cont)} tokens is longer than max_length {L}")
      whole = (list(ctx) + list(cont))[-(L + 1):]              # hf: cut from the left
      pairs.append((whole[:len(whole) - len(cont)], cont))
    s = loglik.score_pairs(self.model, pairs, self.batch_size)
    out = []
    for (key, _, _), lp, greedy in zip(requests, s.logprob, s.greedy):
      answer = (float(lp), bool(greedy))
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
      out.append(answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    texts = [self.tok_encode(req.args[0]) for req in requests]
    out = rolling_scores(self.model, texts, self.prefix_token_id, self.batch_size,
                         self.max_length).logprob.tolist()
    for req, v in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, v)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    out = [""] * len(requests)
    for idx in groups.values():
      kw = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
      until = handle_stop_sequences(kw.pop("until", None), eos=eos)
      budget = kw.pop("max_gen_toks")
      sample = bool(kw.pop("do_sample", False)) and kw.get("temperature", 0) > 0
      self.key, sub = jax.random.split(self.key)
      texts = generation.generate_until(
          self.model, _Tokenizer(self), [requests[i].args[0] for i in idx], until=until,
          max_new_tokens=budget, temperature=float(kw.get("temperature", 0.0)) if sample
          else 0.0, top_k=int(kw.get("top_k") or 0), top_p=float(kw.get("top_p") or 1.0),
          key=sub if sample else None, batch_size=self.batch_size)
      for i, (t,) in zip(idx, texts):
        out[i] = t
        self.cache_hook.add_partial("generate_until", requests[i].args, t)
    return out


def _chat_template_args(enable_thinking, extra) -> dict:
  """The keyword arguments HFLM passes to the chat template. Thinking traces (HFLM's
  `think_end_token`) are not supported: enable_thinking may only turn them off."""
  if isinstance(enable_thinking, str):
    enable_thinking = enable_thinking.lower() == "true"
  if enable_thinking:
    raise ValueError("factflip model_args: enable_thinking=True (reasoning traces cut at "
                     "think_end_token) is not supported; use enable_thinking=False or the hf "
                     "backend")
  args = dict(extra or {})
  return args if enable_thinking is None else {**args, "enable_thinking": enable_thinking}


class _Tokenizer:
  """The tokenizer as `generation.generate_until` uses it, encoding by this model's rules
  (`add_bos_token`)."""

  def __init__(self, lm: FactflipLM):
    self._lm, self._tok = lm, lm.tokenizer
    self.bos_token_id, self.eos_token_id = self._tok.bos_token_id, self._tok.eos_token_id
    self.pad_token_id = self._tok.pad_token_id

  def encode(self, text: str, add_special_tokens: bool | None = None):
    if add_special_tokens is False:
      return self._tok.encode(text, add_special_tokens=False)
    return self._lm.tok_encode(text)

  def decode(self, ids, **kw):
    return self._tok.decode(ids, **kw)


def write_local_task(folder: str, name: str, rows, body: str) -> str:
  """A local lm-eval task: `rows` as <folder>/<name>.jsonl and <folder>/<name>.yaml reading
  it as its test split, then `body` (output_type, doc_to_text, metric_list, ...). Returns the
  YAML's path (`--include_path folder` finds it)."""
  import json
  import os

  data = os.path.join(os.path.abspath(folder), f"{name}.jsonl")
  write_jsonl(data, rows)
  path = os.path.join(folder, f"{name}.yaml")
  write_text(path, f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                   f"    test: {json.dumps(data)}\ntest_split: test\n{body}")
  return path


def main(argv: list[str] | None = None) -> None:
  """lm-eval's command line (`lm-eval run ...` arguments) with `--model factflip` available."""
  from lm_eval.__main__ import cli_evaluate
  sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
  cli_evaluate()


if __name__ == "__main__":
  main()
