"""Insertion of the repair into a model: `attach` and `detach`.

Each named layer is replaced, in its parent, by a `RepairWrapper` that runs the original layer
and then its `RepairModule` (a real module with buffers: `state_dict`, `.to()` / `.half()`,
`torch.compile` and `torch.export` all see it). A forward hook with the repair module as a
child of the layer would run the repair twice when the layer is an `nn.Sequential` (which calls
every child), hence the wrapper. The state dict keeps the layer's original keys (the wrapper
renames `<layer>.layer.*` back to `<layer>.*`), plus `<layer>.fire_repair.*`. `detach` puts the
original module objects back, leaving the model exactly as before.
"""
import contextlib
from typing import Optional

import torch

from ._op.layout import physical_perm
from .outputs import hidden_state, with_hidden_state
from .profile import MODULE_WORDS, LayerProfile, Profile, check_values
from .smoothing import SmoothingHook

CHILD = "fire_repair"


class RepairModule(torch.nn.Module):
    """Applies `torch.ops.fire.repair` to its input with the tensors of one profile layer.

    It owns its tensors, so it is where their values are checked (the op itself reads no value:
    see `fire_repair.ops`): at construction, in `load_layer` and in `load_state_dict` (before
    anything is copied in), and on demand with `check()`. The buffers stay fp32 whatever the
    model's dtype (`.half()`, `.to(torch.bfloat16)` move them, never round them: the kernels
    compute in fp32 anyway), and flattened directions follow the memory format of the inputs
    they meet (once, in eager mode), so the op never converts or permutes them per call."""

    BUFFERS = ("directions", "alpha", "center", "tau", "score_scale", "slope")

    def __init__(self, layer: LayerProfile):
        super().__init__()
        layer.validate()
        self.layer_name, self.mode, self.channel_dim = layer.name, layer.mode, layer.channel_dim
        f32 = dict(dtype=torch.float32, memory_format=torch.contiguous_format)
        self.register_buffer("directions", layer.directions.detach().to(**f32, copy=True))
        self.register_buffer("alpha", layer.alpha.detach().to(**f32, copy=True))
        self.register_buffer("center", layer.center.detach().to(**f32, copy=True))
        self.register_buffer("tau", None if layer.tau is None else layer.tau.detach().to(**f32, copy=True))
        self.register_buffer("slope", None if layer.slope is None else layer.slope.detach().to(**f32, copy=True))
        scale = layer.score_scale if layer.score_scale is not None else torch.ones(layer.k)
        self.register_buffer("score_scale", scale.detach().to(**f32, copy=True))
        self._capture: Optional["Capture"] = None  # set only inside `capture(model)`
        self._smoothing: Optional[SmoothingHook] = None  # the model's pre-hook that reads this layer's scores
        self.register_load_state_dict_pre_hook(_check_incoming)
        self._register_state_dict_hook(_contiguous_state)

    def check(self) -> None:
        """Raises ValueError if a buffer holds a value the repair cannot use (NaN or inf; NaN
        in tau), e.g. after a write that bypassed the library (`.data`, numpy, storage)."""
        _check_values(self.layer_name, self.mode, {name: getattr(self, name) for name in self.BUFFERS})

    def _apply(self, fn, recurse=True):
        # device moves apply; dtype casts do not (a cast to bf16 and back would round the
        # directions for nothing: the kernels read any dtype but compute in fp32)
        def keep_dtype(t):
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)

        return super()._apply(keep_dtype, recurse)

    def _follow_layout(self, h: torch.Tensor) -> None:
        """Lays flattened directions and centre out in h's physical order of feature dims
        (e.g. channels_last), once, in eager mode: the op then reads them without a copy."""
        if self.channel_dim is not None or self.directions.dim() != h.dim() or torch.compiler.is_compiling() or \
                (h.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        # the common layouts, already followed, cost a couple of C++ checks per call
        if h.is_contiguous() and self.directions.is_contiguous():
            return
        cl = torch.channels_last
        if h.dim() == 4 and h.is_contiguous(memory_format=cl) and self.directions.is_contiguous(memory_format=cl):
            return
        if torch.is_inference_mode_enabled():  # new buffers made here would be inference tensors
            return
        perm = physical_perm(h)
        if perm is None:
            return
        for name, lead in (("directions", 1), ("center", 0)):
            t = getattr(self, name)
            order = list(range(lead)) + [p - 1 + lead for p in perm]  # outermost first
            if t.permute(*order).is_contiguous():
                continue
            inverse = [order.index(d) for d in range(t.dim())]
            setattr(self, name, t.permute(*order).contiguous().permute(*inverse))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self._follow_layout(h)
        if self._capture is None:
            return torch.ops.fire.repair(h, self.directions, self.alpha, self.center, self.tau, self.mode,
                                         self.channel_dim, self.slope)
        out, c = torch.ops.fire.repair_with_scores(h, self.directions, self.alpha, self.center, self.tau, self.mode,
                                                   self.channel_dim, self.slope)
        self._capture._record(self.layer_name, h.detach(), c.detach())
        return out

    def backdoor_score(self, c: torch.Tensor) -> torch.Tensor:
        """Per-sample backdoor score from the projections c ((N, K), or (N, *positions, K) per
        position): the largest projection, over directions and positions, in units of its
        clean std."""
        return (c / self.score_scale.float()).flatten(1).amax(dim=1)

    def backdoor_scores(self, h: torch.Tensor) -> torch.Tensor:
        """The per-sample backdoor score of the layer outputs h (from the op's projections)."""
        _, c = torch.ops.fire.repair_with_scores(h, self.directions, self.alpha, self.center, self.tau, self.mode,
                                                 self.channel_dim, self.slope)
        return self.backdoor_score(c)

    @torch.no_grad()
    def load_layer(self, layer: LayerProfile) -> None:
        """Updates the buffers in place (same tensors: compiled graphs and CUDA graphs stay valid)."""
        if layer.mode != self.mode or layer.directions.shape != self.directions.shape or \
                layer.channel_dim != self.channel_dim:
            raise ValueError(f"layer {layer.name!r}: cannot update in place from mode {layer.mode}, "
                             f"shape {tuple(layer.directions.shape)}")
        layer.validate()  # its tensors may have been edited since it was built
        self.directions.copy_(layer.directions)
        self.alpha.copy_(layer.alpha)
        self.center.copy_(layer.center)
        if self.tau is not None:
            self.tau.copy_(layer.tau)
        if self.slope is not None:
            self.slope.copy_(layer.slope)
        if layer.score_scale is not None:
            self.score_scale.copy_(layer.score_scale)

    def __getstate__(self):
        # a copy (copy.deepcopy, pickle) taken inside `capture(model)` is not being captured
        state = dict(self.__dict__)
        state["_capture"] = None
        return state

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"fire_repair: TorchScript (torch.jit.script) is not supported for repaired models (the repair at "
            f"{self.layer_name!r} wraps its layer with a forward taking *args, **kwargs, which TorchScript cannot "
            "compile); use torch.compile or torch.export, which are supported")

    def extra_repr(self) -> str:
        form = "flattened" if self.channel_dim is None else f"per position, channel_dim={self.channel_dim}"
        return f"layer={self.layer_name!r}, mode={self.mode!r}, k={self.directions.shape[0]}, {form}"


def _check_values(layer_name: str, mode: str, tensors: dict) -> None:
    check_values(tensors, mode, f"the repair at {layer_name!r}", MODULE_WORDS)  # the rules LayerProfile applies


def _contiguous_state(module, state_dict, prefix, local_metadata):
    """Saved tensors are contiguous whatever layout the buffers follow (safetensors requires it)."""
    for name in ("directions", "center"):
        key = prefix + name
        if key in state_dict and not state_dict[key].is_contiguous():
            state_dict[key] = state_dict[key].contiguous()
    return state_dict


def _check_incoming(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Before load_state_dict copies anything into a RepairModule: its new values must be usable."""
    # the state as it will be after loading, whatever subset arrives (a tensor of another shape
    # is not loaded: torch reports the size mismatch)
    after = {name: getattr(module, name) for name in module.BUFFERS}
    for name in module.BUFFERS:
        t = state_dict.get(prefix + name)
        if isinstance(t, torch.Tensor) and after[name] is not None and t.shape == after[name].shape:
            after[name] = t
    _check_values(module.layer_name, module.mode, after)


def check_repairs(model: torch.nn.Module) -> None:
    """Re-checks the values of every repair attached to `model` (RepairModule.check); raises
    ValueError naming the layer and tensor. The op does not read values on each call (a device
    sync per call), so a server that lets code write into the buffers directly can call this."""
    for module in repair_modules(model).values():
        module.check()


class RepairWrapper(torch.nn.Module):
    """`fire_repair(layer(...))`, with the layer's state-dict keys unchanged."""

    def __init__(self, layer: torch.nn.Module, repair: RepairModule):
        super().__init__()
        self.layer = layer
        self.fire_repair = repair
        self._register_state_dict_hook(_drop_infix)
        self._register_load_state_dict_pre_hook(_add_infix)

    def __getattr__(self, name):
        # the wrapped layer's attributes stay reachable where the model reads them (Hugging Face
        # modules read e.g. `self.embeddings.patch_embeddings` from their parents)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("layer", CHILD):
                raise
            return getattr(super().__getattr__("layer"), name)

    def forward(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)  # a tensor, or a tuple / ModelOutput around one (see outputs.py)
        return with_hidden_state(out, self.fire_repair(hidden_state(out, self.fire_repair.layer_name)))


def _drop_infix(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "layer.")]:
        state_dict[prefix + key[len(prefix) + len("layer."):]] = state_dict.pop(key)
    return state_dict


def _add_infix(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if not rest.startswith((CHILD + ".", "layer.")):
            state_dict[prefix + "layer." + rest] = state_dict.pop(key)


def _parent(model: torch.nn.Module, name: str):
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, child


class Capture:
    """What the repair modules saw in the forward passes run inside `capture(model)`: per
    layer, the last pass's `inputs` (the activations before repair) and `projections` (the raw
    c = V (x - center), (N, K), or (N, *positions, K) per position), and `score(layer)`, the
    per-sample backdoor score (the largest projection in units of its clean std)."""

    def __init__(self, modules: dict):
        self.modules = modules
        self.inputs: dict = {}
        self.projections: dict = {}

    def _record(self, layer: str, h: torch.Tensor, c: torch.Tensor) -> None:
        self.inputs[layer], self.projections[layer] = h, c

    def score(self, layer: str) -> torch.Tensor:
        if layer not in self.projections:
            raise KeyError(f"no forward pass through the repair at {layer!r} was captured "
                           f"(captured: {sorted(self.projections)})")
        return self.modules[layer].backdoor_score(self.projections[layer])


@contextlib.contextmanager
def capture(model: torch.nn.Module):
    """Captures each attached repair's input and projections for the forwards inside the block
    (from the same fused pass: no second read), and restores the modules on exit.

    >>> with fire_repair.capture(model) as cap:
    ...     model(x)
    >>> cap.score("layer3"), cap.inputs["layer3"]
    """
    modules = repair_modules(model)
    if not modules:
        raise RuntimeError("no repair is attached to this model (fire_repair.attach first)")
    busy = [name for name, m in modules.items() if m._capture is not None]
    if busy:
        raise RuntimeError(f"the repairs at {busy} are already being captured (nested capture)")
    cap = Capture(modules)
    for m in modules.values():
        m._capture = cap
    try:
        yield cap
    finally:
        for m in modules.values():
            m._capture = None


def attach(model: torch.nn.Module, profile: Profile, check_fingerprint: bool = True) -> torch.nn.Module:
    """Puts a RepairModule after each layer of the profile. Returns the same model object.
    (`capture(model)` gives each repaired layer's inputs and projections.)"""
    if any(layer.name == "" for layer in profile.layers):
        raise ValueError("the profile names the whole model; name the layer whose output to repair")
    existing = repair_modules(model)
    if existing:
        raise RuntimeError(f"the model is already repaired at {sorted(existing)}; call fire_repair.detach(model) first")
    profile.check(model, check_fingerprint=check_fingerprint)
    profile.check_smoothing()  # before anything is wrapped
    modules = dict(model.named_modules())
    ref = next(iter(model.parameters()), None)
    # deepest first: a child wrapped after its parent would be put into the parent's old place,
    # where it never runs; wrapped before, it lives inside the module the parent's wrapper runs
    for layer in sorted(profile.layers, key=lambda layer: -layer.name.count(".")):
        repair = RepairModule(layer)
        if ref is not None:
            repair.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
        parent, child = _parent(model, layer.name)
        setattr(parent, child, RepairWrapper(modules[layer.name], repair))
    if profile.smoothing is not None:  # kept on the repair module it reads, removed by detach
        repair = repair_modules(model)[profile.smoothing.layer]
        repair._smoothing = SmoothingHook(model, repair, profile.smoothing)
    return model


@contextlib.contextmanager
def attached(model: torch.nn.Module, profile: Profile, check_fingerprint: bool = True):
    """`attach` for the duration of a block, then `detach`, whatever happens inside:

    >>> with fire_repair.attached(model, profile):
    ...     y = model(x)
    """
    attach(model, profile, check_fingerprint=check_fingerprint)
    try:
        yield model
    finally:
        detach(model)


def detach(model: torch.nn.Module) -> torch.nn.Module:
    """Removes every repair attached to the model (a no-op on a model without one)."""
    paths = [name for name, m in model.named_modules() if isinstance(m, RepairWrapper)]
    for repair in repair_modules(model).values():
        if repair._smoothing is not None:
            repair._smoothing.remove()
            repair._smoothing = None
    for name in sorted(paths, key=lambda n: -n.count(".")):
        parent, child = _parent(model, name)
        setattr(parent, child, getattr(parent, child).layer)
    return model


def repair_modules(model: torch.nn.Module) -> dict:
    """{layer name (as the profile names it): RepairModule} of an attached model."""
    return {m.fire_repair.layer_name: m.fire_repair for m in model.modules() if isinstance(m, RepairWrapper)}
