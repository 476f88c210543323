r"""One call that makes a Hugging Face causal LM compute its loss through logitkit's fused head.

How it stays generic (no per-architecture code, no dependence on the forward's keyword names): the
patched ``forward`` takes the loss arguments off the call, runs the model's own forward without
them, and a forward pre-hook on the output head (``get_output_embeddings()``) captures the hidden
states the head receives and hands it an empty slice, so the head and whatever the forward does to
the logits afterwards run on ``(B, 0, V)``. The loss is then
``linear_cross_entropy(hidden, W, shifted labels, linear_bias=b, softcap=c, temperature=T)`` with
``c``/``T`` read from the config; :func:`apply` verifies that reading against the unpatched
forward (see :func:`_verify`) and refuses the model when they differ.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from typing import Any, Optional

import torch
from torch import Tensor

from ..linear import check_chunk_size
from ..torch import linear_cross_entropy, linear_entropy, linear_token_logprobs

__all__ = ["apply", "revert", "is_applied", "token_logprobs", "LogitkitPatchError"]

_STATE = "_logitkit_patch"


class LogitkitPatchError(ValueError):
    """The model's head or loss is something :func:`apply` cannot reproduce exactly."""


class _State:
    def __init__(self, model: Any, head: Any, softcap: Optional[float], temperature: float, chunk_size: Any,
                 return_logits: bool, had_forward: bool, forward: Any) -> None:
        self.head, self.softcap, self.temperature = head, softcap, temperature
        self.chunk_size, self.return_logits = chunk_size, return_logits
        self.had_forward, self.forward = had_forward, forward
        self.labels_pos = _positional_index(forward, "labels")
        self.trl = _trl_options(forward)


def _positional_index(fn: Any, name: str) -> Optional[int]:
    """Index of ``name`` among ``fn``'s positional parameters (``labels`` may come positionally)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    pos = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return pos.index(name) if name in pos else None


def _text_config(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise LogitkitPatchError(f"model: {type(model).__name__} has no .config; expected a transformers "
                                 f"PreTrainedModel (or a PEFT model wrapping one)")
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _logit_transform(cfg: Any) -> tuple[Optional[float], float, list[str]]:
    """``(softcap, temperature, what was read)`` from the config's logit options.

    Gemma 2/3 ``final_logit_softcapping`` c: c·tanh(x/c). Cohere ``logit_scale`` s: x·s = x/(1/s).
    Granite ``logits_scaling`` d: x/d. The forward's actual arithmetic is checked by :func:`_verify`.
    """
    read = []
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0 or not math.isfinite(softcap):
            raise LogitkitPatchError(f"config.final_logit_softcapping: expected a positive finite value or None, "
                                     f"got {softcap}")
        read.append(f"final_logit_softcapping={softcap}")
    temperature = 1.0
    scale = getattr(cfg, "logit_scale", None)
    if scale is not None:
        scale = float(scale)
        if not scale > 0 or not math.isfinite(scale):
            raise LogitkitPatchError(f"config.logit_scale: expected a positive finite value or None, got {scale}")
        temperature /= scale
        read.append(f"logit_scale={scale}")
    div = getattr(cfg, "logits_scaling", None)
    if div is not None:
        div = float(div)
        if not div > 0 or not math.isfinite(div):
            raise LogitkitPatchError(f"config.logits_scaling: expected a positive finite value or None, got {div}")
        temperature *= div
        read.append(f"logits_scaling={div}")
    return softcap, temperature, read


def _is_lora_linear(head: Any) -> bool:
    t = type(head)
    return t.__name__ == "Linear" and t.__module__.startswith("peft.tuners.lora") and \
        type(getattr(head, "base_layer", None)).forward is torch.nn.Linear.forward


def _head_of(model: Any) -> Any:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise LogitkitPatchError(f"model: {type(model).__name__}.get_output_embeddings() returned no output head; "
                                 f"logitkit.transformers.apply needs a causal LM with a linear head")
    if type(head).forward is not torch.nn.Linear.forward and not _is_lora_linear(head):
        raise LogitkitPatchError(
            f"model: the output head is a {type(head).__module__}.{type(head).__name__}, not a plain "
            f"torch.nn.Linear or a PEFT LoRA Linear over one (a quantized or custom head computes something else "
            f"than hidden @ weight.T + bias); leave this model unpatched")
    W = head.weight
    if W.dim() != 2:
        raise LogitkitPatchError(f"model: output head weight must be (V, H), got shape {tuple(W.shape)}")
    b = getattr(head, "base_layer", head).bias
    if b is not None and tuple(b.shape) != (W.shape[0],):
        raise LogitkitPatchError(f"model: output head bias must be ({W.shape[0]},), got {tuple(b.shape)}")
    return head


def _weights(head: Any) -> tuple[Tensor, Optional[Tensor]]:
    """The head's effective ``(W, b)``: a LoRA head's is ``W + Σ s·B A`` (differentiable in A, B)."""
    if not _is_lora_linear(head):
        return head.weight, head.bias
    base = head.base_layer
    W, b = base.weight, base.bias
    if head.disable_adapters or head.merged:
        return W, b
    for name in head.active_adapters:
        if name not in head.lora_A.keys():
            continue
        if name in getattr(head, "lora_variant", {}):
            raise LogitkitPatchError(f"logitkit.transformers: the LoRA head's adapter {name!r} is a variant "
                                     f"({type(head.lora_variant[name]).__name__}, e.g. DoRA) that the patch does "
                                     f"not reproduce")
        drop = head.lora_dropout[name]
        if not isinstance(drop, torch.nn.Identity) and drop.training and getattr(drop, "p", 1.0) > 0:
            raise LogitkitPatchError(f"logitkit.transformers: the LoRA head's adapter {name!r} has lora_dropout "
                                     f"p={drop.p} in training; dropout on the adapter's input alone cannot be fused "
                                     f"into the head (use lora_dropout=0 on the head, or leave it out of "
                                     f"target_modules)")
        A, B, s = head.lora_A[name], head.lora_B[name], head.scaling[name]
        W = W + (s * (B.weight @ A.weight)).to(W.dtype)
        if B.bias is not None:
            b = (s * B.bias).to(W.dtype) if b is None else b + (s * B.bias).to(b.dtype)
    return W, b


class _Capture:
    """Forward pre-hook on the head: keeps its input, lets it run on an empty slice of it."""

    def __init__(self, head: Any) -> None:
        self.head, self.hidden, self.calls = head, None, 0

    def _hook(self, module: Any, args: tuple) -> tuple:
        self.calls += 1
        (x, *rest) = args
        self.hidden = x
        return (x[..., :0, :], *rest)

    def __enter__(self) -> "_Capture":
        self.handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``F.linear`` would run in under an enabled autocast region, else ``None``."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (TypeError, RuntimeError, AttributeError):  # pragma: no cover - older torch signatures
        pass
    return None


def _head_tensors(st: _State, hidden: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    W, b = _weights(st.head)
    hidden = hidden.to(W.device)
    dt = _autocast_dtype(hidden.device)
    if dt is not None:  # what autocast would have given the head's F.linear
        hidden, W = hidden.to(dt), W.to(dt)
        b = None if b is None else b.to(dt)
    elif hidden.dtype != W.dtype:
        raise TypeError(f"logitkit.transformers: the head's input is {hidden.dtype} but its weight is {W.dtype} "
                        f"(outside autocast, nn.Linear would fail too)")
    return hidden, W, b


def _logits(st: _State, hidden: Tensor) -> Tensor:
    """The full logits, as the model's forward makes them (only for ``return_logits=True``)."""
    logits = st.head(hidden)
    if st.softcap is not None:
        logits = torch.tanh(logits / st.softcap) * st.softcap
    if st.temperature != 1.0:
        logits = logits / st.temperature
    return logits


def _shifted(labels: Optional[Tensor], shift_labels: Optional[Tensor], ignore_index: int) -> Tensor:
    """HF's ForCausalLMLoss shift: pad with ``ignore_index`` and drop the first position."""
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _loss(st: _State, hidden: Tensor, labels: Optional[Tensor], shift_labels: Optional[Tensor],
          num_items_in_batch: Any, ignore_index: int) -> Tensor:
    H = hidden.shape[-1]
    lab = _shifted(labels, shift_labels, ignore_index)
    rows = hidden.numel() // H if H else 0
    if lab.numel() != rows:
        name = "shift_labels" if shift_labels is not None else "labels"
        raise ValueError(f"{name}: expected {rows} elements (one per position the head sees, hidden states of shape "
                         f"{tuple(hidden.shape)}), got shape {tuple(lab.shape)}; with labels, logits_to_keep must "
                         f"keep every position")
    h, W, b = _head_tensors(st, hidden)
    lab = lab.to(h.device).reshape(-1)
    red = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(h.reshape(-1, H), W, lab, linear_bias=b, ignore_index=ignore_index, reduction=red,
                                softcap=st.softcap, temperature=st.temperature, chunk_size=st.chunk_size)
    # HF computes its loss in float32 (logits.float()); the fused loss comes back in the head's dtype
    loss = loss.float()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _pop_labels(st: _State, args: tuple, kwargs: dict) -> tuple[tuple, Optional[Tensor]]:
    labels = kwargs.pop("labels", None)
    i = st.labels_pos
    if i is not None and len(args) > i:
        if labels is not None:
            raise TypeError("forward() got multiple values for argument 'labels'")
        labels, args = args[i], args[:i] + (None,) + args[i + 1:]
    return args, labels


def _patched_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    # the state is read from the instance at each call: a deepcopy of a patched model computes with its
    # own weights (copy rebinds the saved bound forward and head to the copy)
    st = vars(self)[_STATE]
    orig = st.forward
    fused = kwargs.pop("fused_lm_head", False)
    args, labels = _pop_labels(st, args, kwargs)
    shift_labels = kwargs.pop("shift_labels", None)
    if fused:
        return _trl_fused(self, st, args, kwargs, labels, shift_labels)
    if labels is None and shift_labels is None:
        return orig(*args, **kwargs)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    return_dict = kwargs.pop("return_dict", None)
    with _Capture(st.head) as cap:
        out = orig(*args, return_dict=True, **kwargs)
    if cap.calls != 1:
        raise LogitkitPatchError(f"logitkit.transformers: {type(self).__name__}'s forward called its output head "
                                 f"{cap.calls} times; the patch supports exactly one call")
    if isinstance(out, tuple) or not hasattr(out, "keys"):
        raise LogitkitPatchError(f"logitkit.transformers: {type(self).__name__}'s forward returned a "
                                 f"{type(out).__name__}, not a ModelOutput, with return_dict=True")
    if getattr(out, "aux_loss", None) is not None:
        raise LogitkitPatchError("logitkit.transformers: the model returned an aux_loss (MoE router loss), which "
                                 "its own loss adds with a coefficient; the patch does not reproduce that")
    hidden = cap.hidden
    loss = _loss(st, hidden, labels, shift_labels, num_items_in_batch, ignore_index)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    logits = _logits(st, hidden) if st.return_logits else None
    out = type(out)(loss=loss, logits=logits, **fields)
    use_dict = return_dict if return_dict is not None else getattr(getattr(self, "config", None),
                                                                   "return_dict", True)
    return out if use_dict or use_dict is None else out.to_tuple()


def _make_forward(model: Any, st: _State) -> Any:
    """The patched forward, bound to ``model``, with the signature of the forward it replaces.

    ``generate`` and ``Trainer`` read that signature (``logits_to_keep``, ``num_items_in_batch``).
    """
    orig = st.forward
    func = getattr(orig, "__func__", None)
    if func is not None and getattr(orig, "__self__", None) is model:
        fn = functools.wraps(func)(lambda self, *a, **k: _patched_forward(self, *a, **k))
        return types.MethodType(fn, model)
    # a forward that is not a method of this model (set by a wrapper): bound by closure
    return functools.wraps(orig)(lambda *a, **k: _patched_forward(model, *a, **k))


# TRL's fused LM head protocol: ``model(..., labels, fused_lm_head=True)`` -> per-token outputs.
# TRL (>= 1.16) patches the model's forward with its own chunked head when a trainer is built
# (``trl.trainer.utils.add_fused_lm_head``); applied afterwards, logitkit serves those calls instead,
# with the options TRL's patch was given.

_TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")


def _trl_options(forward: Any) -> dict:
    """``temperature``, ``outputs``, ``cast_lm_head_to_fp32`` of a TRL fused-head forward, if it is one."""
    fn = getattr(forward, "__func__", forward)
    code = getattr(fn, "__code__", None)  # functools.wraps gave the function the model's names; its code keeps its own
    if code is None or code.co_name != "_fused_forward" or "trl" not in code.co_filename.replace("\\", "/").split("/"):
        return {}
    try:
        nl = inspect.getclosurevars(fn).nonlocals
        return {k: nl[k] for k in ("temperature", "outputs", "cast_lm_head_to_fp32")}
    except (KeyError, TypeError, ValueError) as e:
        raise LogitkitPatchError(f"logitkit.transformers: cannot read the options of TRL's fused head patch ({e}); "
                                 f"this TRL version is not supported") from e


def _trl_output_class() -> Any:
    try:
        from trl.trainer.utils import FusedCausalLMOutput
        return FusedCausalLMOutput
    except ImportError:  # without TRL: a plain ModelOutput with the same fields
        from transformers.utils import ModelOutput
        import dataclasses

        return dataclasses.make_dataclass("FusedCausalLMOutput", [(f, Optional[Tensor], None) for f in (
            "loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask", "aux_loss")],
            bases=(ModelOutput,))


def _argmax_rows(h: Tensor, W: Tensor, b: Optional[Tensor], rows: int = 2048) -> Tensor:
    """``argmax(h @ W.T + b)`` per row, ``rows`` at a time (softcap and temperature keep the argmax)."""
    out = torch.empty(h.shape[0], dtype=torch.long, device=h.device)
    with torch.no_grad():
        for i in range(0, h.shape[0], rows):
            z = h[i:i + rows] @ W.T
            out[i:i + rows] = (z if b is None else z + b).argmax(-1)
    return out


def _trl_fused(model: Any, st: _State, args: tuple, kwargs: dict, labels: Optional[Tensor],
               shift_labels: Optional[Tensor]) -> Any:
    opts = st.trl or {}
    want = tuple(opts.get("outputs", ("log_probs",)))
    bad = [o for o in want if o not in _TRL_OUTPUTS]
    if bad:
        raise LogitkitPatchError(f"logitkit.transformers: TRL asked the fused head for {bad}; logitkit computes "
                                 f"{list(_TRL_OUTPUTS)}")
    if kwargs.get("output_router_logits") or getattr(_text_config(model), "output_router_logits", False):
        raise LogitkitPatchError("logitkit.transformers: MoE router losses (output_router_logits) are not reproduced "
                                 "by the patch; leave this model to TRL's own fused head")
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("return_dict", None)
    kwargs["use_cache"] = False
    with _Capture(st.head) as cap:
        st.forward(*args, return_dict=True, **kwargs)
    if cap.calls != 1:
        raise LogitkitPatchError(f"logitkit.transformers: {type(model).__name__}'s forward called its output head "
                                 f"{cap.calls} times; the patch supports exactly one call")
    hidden = cap.hidden
    if shift_labels is None:
        hidden, lab = hidden[:, :-1], labels[:, 1:]
    else:
        lab = shift_labels
    h, W, b = _head_tensors(st, hidden)
    if opts.get("cast_lm_head_to_fp32"):
        h, W, b = h.float(), W.float(), None if b is None else b.float()
    lab = lab.to(h.device)
    mask = lab != -100
    hs, ls = h[mask], lab[mask]
    T = st.temperature * float(opts.get("temperature", 1.0))
    kw = dict(linear_bias=b, softcap=st.softcap, temperature=T, chunk_size=st.chunk_size)
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=h.device)
    # masked_scatter keeps an all-ignored micro-batch connected to the graph (a zero loss that backpropagates)
    log_probs = zeros.masked_scatter(mask, linear_token_logprobs(hs, W, ls, **kw).float())
    entropy = is_top1 = None
    if "entropy" in want:
        entropy = zeros.masked_scatter(mask, linear_entropy(hs, W, **kw).float())
    if "is_top1" in want:
        is_top1 = torch.zeros(mask.shape, dtype=torch.bool, device=h.device)
        is_top1[mask] = _argmax_rows(hs.detach(), W.detach(), None if b is None else b.detach()) == ls
    n = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / n
    return _trl_output_class()(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)


def _probe_inputs(model: Any, V: int) -> tuple[Tensor, Tensor]:
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    dev = emb.weight.device if emb is not None and hasattr(emb, "weight") else model.get_output_embeddings().weight.device
    n = min(V, int(getattr(_text_config(model), "vocab_size", V) or V))
    ids = (torch.arange(7, device=dev) * 7919 + 3) % n
    labels = ids.clone()
    labels[2] = -100
    return ids[None], labels[None]


def _verify(model: Any, forward: Any, head: Any, softcap: Optional[float], temperature: float,
            read: list[str]) -> None:
    """Run the unpatched forward once with the head's output replaced by known values ``z``.

    The returned logits must be ``T⁻¹·c·tanh(z/c)`` and the loss HF's ForCausalLMLoss of them (mean, and
    sum / ``num_items_in_batch``) as logitkit computes it. Catches a transform the config does not
    announce, a different loss, or a head that is not the one that makes the logits.
    """
    V = head.weight.shape[0]
    ids, labels = _probe_inputs(model, V)
    store: dict = {}

    def hook(module: Any, args: tuple, out: Tensor) -> Tensor:
        n = out.numel()
        g = torch.Generator().manual_seed(0)
        z = torch.linspace(-40.0, 40.0, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
        store["z"] = z.reshape(out.shape).to(device=out.device, dtype=out.dtype)
        return store["z"]

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    handle = head.register_forward_hook(hook)
    try:
        with torch.no_grad():
            o1 = forward(input_ids=ids, labels=labels, return_dict=True)
            z1 = store.pop("z", None)
            nib = 3.0
            try:
                o2 = forward(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(nib), return_dict=True)
            except TypeError:  # a forward without **kwargs: HF's loss there has no num_items_in_batch either
                o2 = None
    except LogitkitPatchError:
        raise
    except Exception as e:
        raise LogitkitPatchError(f"logitkit.transformers.apply: could not verify {type(model).__name__} (its forward "
                                 f"on a 1x7 probe raised {type(e).__name__}: {e}); pass verify=False to patch it "
                                 f"unverified") from e
    finally:
        handle.remove()
        for m, t in modes:
            m.training = t
    where = f"{type(model).__name__} (config: {', '.join(read) or 'no logit transform'})"
    if z1 is None:
        raise LogitkitPatchError(f"logitkit.transformers.apply: {where}'s forward does not call the output head "
                                 f"returned by get_output_embeddings(); the patch cannot capture its hidden states")
    z = z1.double().cpu()
    want = z if softcap is None else softcap * torch.tanh(z / softcap)
    want = want / temperature
    got = getattr(o1, "logits", None)
    low = z1.dtype in (torch.float16, torch.bfloat16)  # the head's output dtype (autocast included)
    rtol, atol = (2e-2, 2e-1) if low else (1e-5, 1e-4)
    if got is None or tuple(got.shape) != tuple(want.shape) or not torch.allclose(
            got.double().cpu(), want, rtol=rtol, atol=atol):
        diff = "no logits" if got is None or got.shape != want.shape else \
            f"max |diff| {(got.double().cpu() - want).abs().max().item():.3g}"
        raise LogitkitPatchError(f"logitkit.transformers.apply: {where}: the forward's logits are not "
                                 f"c*tanh(head/c)/T with the values read from the config ({diff}); its forward "
                                 f"transforms the logits in a way logitkit does not reproduce")
    lab = _shifted(labels, None, -100).reshape(-1).cpu()
    ce = torch.nn.functional.cross_entropy(want.reshape(-1, V), lab, ignore_index=-100, reduction="sum")
    cnt = (lab != -100).sum()
    checks = [("mean", o1, ce / cnt)] + ([] if o2 is None else [("sum / num_items_in_batch", o2, ce / nib)])
    for what, o, ref in checks:
        loss = getattr(o, "loss", None)
        if loss is None or not math.isclose(float(loss), float(ref), rel_tol=10 * rtol, abs_tol=atol):
            raise LogitkitPatchError(f"logitkit.transformers.apply: {where}: its loss ({what}) is "
                                     f"{None if loss is None else float(loss)}, not the causal-LM cross-entropy "
                                     f"{float(ref)} of its logits; it computes a loss logitkit does not reproduce")


def apply(model: Any, *, chunk_size: Any = None, return_logits: bool = False, verify: bool = True) -> Any:
    r"""Make ``model(..., labels=...)`` compute its loss through logitkit's fused linear cross-entropy.

    Patches this instance only (its ``forward``). With ``labels`` (or ``shift_labels``) the loss is
    HF's causal-LM loss, ``Σ_valid CE(T⁻¹·c·tanh((h W^T + b)/c), shifted labels) / n`` with ``n`` the
    number of labels that are not ``ignore_index`` (-100), or ``num_items_in_batch`` when given, on the
    decoder's last hidden states ``h`` (B, T, H) and the head's weight ``W`` (V, H); the (B, T, V)
    logits are never made and ``outputs.logits`` is ``None`` (unless ``return_logits=True``). Without
    labels the model runs unchanged (generation, logits evaluation).

    Args:
      model: a transformers causal LM (``PreTrainedModel`` with ``get_output_embeddings()``), a PEFT
        model wrapping one, or a ``transformers.Trainer`` (its ``model`` is patched).
      chunk_size: tokens per chunk of the fused head (``None``: automatic).
      return_logits: also compute ``outputs.logits`` (costs the (B, T, V) memory again).
      verify: check once, on a 1x7 probe through the unpatched forward, that the logit transform read
        from the config and the loss are what the model computes; refuse the model otherwise.

    Returns the model. Raises :class:`LogitkitPatchError` (a ValueError) naming what it cannot
    reproduce: a head that is not a plain ``nn.Linear``, an unannounced logit transform, another loss.

    >>> import torch, transformers, logitkit.transformers as lkt
    >>> cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    >>> m = transformers.LlamaForCausalLM(cfg); ids = torch.randint(0, 128, (2, 9))
    >>> ref = m(input_ids=ids, labels=ids).loss
    >>> out = lkt.apply(m)(input_ids=ids, labels=ids)
    >>> out.logits is None, torch.allclose(out.loss, ref, rtol=1e-5)
    (True, True)
    """
    target = getattr(model, "model", None) if _is_trainer(model) else model
    if target is None:
        raise LogitkitPatchError("model: the Trainer has no .model to patch")
    if not isinstance(target, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a transformers PreTrainedModel), got "
                        f"{type(target).__name__}")
    if vars(target).get(_STATE) is not None:
        revert(target)
    chunk_size = check_chunk_size(chunk_size)
    head = _head_of(target)
    softcap, temperature, read = _logit_transform(_text_config(target))
    had_forward = "forward" in vars(target)
    forward = target.forward
    if verify:
        _verify(target, forward, head, softcap, temperature, read)
    st = _State(target, head, softcap, temperature, chunk_size, bool(return_logits), had_forward, forward)
    vars(target)[_STATE] = st  # in the instance dict: a PEFT wrapper's getattr must not find its base's
    st.wrapper = target.forward = _make_forward(target, st)
    return model


def _is_trainer(obj: Any) -> bool:
    return any(c.__name__ == "Trainer" and c.__module__.startswith("transformers") for c in type(obj).__mro__)


def is_applied(model: Any) -> bool:
    """Whether :func:`apply` patched this model (or this Trainer's model)."""
    target = getattr(model, "model", None) if _is_trainer(model) else model
    return hasattr(target, "__dict__") and vars(target).get(_STATE) is not None


def revert(model: Any) -> Any:
    """Undo :func:`apply`: the instance's ``forward`` is what it was before. Returns the model.

    >>> import transformers, logitkit.transformers as lkt
    >>> m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)).eval()
    >>> lkt.is_applied(lkt.revert(lkt.apply(m)))
    False
    """
    target = getattr(model, "model", None) if _is_trainer(model) else model
    st = vars(target).get(_STATE) if hasattr(target, "__dict__") else None
    if st is None:
        raise ValueError(f"model: this {type(target).__name__} was not patched by logitkit.transformers.apply")
    if vars(target).get("forward") is not st.wrapper:
        raise ValueError(f"model: {type(target).__name__}.forward was replaced after logitkit.transformers.apply "
                         f"(by {vars(target).get('forward')!r}); reverting would drop that wrapper too")
    if st.had_forward:
        target.forward = st.forward
    else:
        del target.forward
    del vars(target)[_STATE]
    return model


def token_logprobs(model: Any, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                   temperature: float = 1.0, entropy: bool = False, **kwargs: Any) -> Any:
    r"""``log p(input_ids[:, t+1] | input_ids[:, :t+1])`` per position, through the fused head.

    Returns a (B, T-1) tensor (and the (B, T-1) entropies of the next-token distributions when
    ``entropy=True``), differentiable, computed from the decoder's hidden states and the head's
    weight without the (B, T, V) logits: what PPO / GRPO losses need. ``temperature`` divides the
    model's logits (after its own softcap / scaling). The model need not be patched; when it is not,
    it is verified as in :func:`apply` (once per call: patch it to verify once).

    >>> import torch, transformers, logitkit.transformers as lkt
    >>> m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)).eval()
    >>> ids = torch.randint(0, 64, (2, 5))
    >>> ref = torch.log_softmax(m(ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    >>> torch.allclose(lkt.token_logprobs(m, ids), ref, atol=1e-5)
    True
    """
    if not float(temperature) > 0:
        raise ValueError(f"temperature: expected a positive value, got {temperature}")
    st = vars(model).get(_STATE) if hasattr(model, "__dict__") else None
    if st is None:
        head = _head_of(model)
        softcap, temp, read = _logit_transform(_text_config(model))
        _verify(model, model.forward, head, softcap, temp, read)
        st = _State(model, head, softcap, temp, None, False, False, model.forward)
    with _Capture(st.head) as cap:
        st.forward(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
    if cap.calls != 1:
        raise LogitkitPatchError(f"logitkit.transformers: {type(model).__name__}'s forward called its output head "
                                 f"{cap.calls} times; token_logprobs supports exactly one call")
    hidden = cap.hidden[:, :-1]
    h, W, b = _head_tensors(st, hidden)
    lab = input_ids[:, 1:].to(h.device)
    T = st.temperature * float(temperature)
    lp = linear_token_logprobs(h, W, lab, linear_bias=b, softcap=st.softcap, temperature=T, chunk_size=st.chunk_size)
    if not entropy:
        return lp
    ent = linear_entropy(h, W, linear_bias=b, softcap=st.softcap, temperature=T, chunk_size=st.chunk_size)
    return lp, ent
