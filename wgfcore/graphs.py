"""CUDA-graph sampling (`sample(..., cuda_graph=True)`): a sampler's whole loop captured once, then replayed.

ALGORITHMS §2: a run's coefficient tables are fixed before its loop, so the loop of one sampler spec
(networks included) is the same work every time the same signature is asked for; a graph records
it once and replays it with new inputs (the prior draw, the noise key or generator seed).

What a capture is keyed on (`graph_key`): the sampler, shape, dtype, device, backend, grid, SDE,
denoise_last, options, the autocast state, and for each network what the graph read of it:

- an `nn.Module`: its identity, the storage (address, dtype, shape, strides) and version of every
  parameter and buffer, its tensor attributes, its python scalar attributes (flags, modes) and the
  training flag of every submodule. `net.to(dtype)`, `set_kernels(...)`, `load_state_dict(...)`
  (in place: a new version; `assign=True`: new storage) all give a new key, never a stale replay;
- a function (a closure, a lambda, a bound method, a `functools.partial`): its identity, and what
  is reachable from it: closure cells, the globals its code names, defaults, a bound object's
  attributes, one level into lists, tuples and dicts; modules and tensors as above, python
  scalars by value, other functions recursively (4 levels).
  Not covered: state reached only deeper than that (an attribute of an attribute of a plain
  object, a container inside a container), and python control flow that depends on anything
  else (time, randomness, global flags of other modules): call `release_graphs()` after changing it.

A new key is run eagerly the first time it is seen (on a side stream: that run is also the warm-up
a capture needs) and captured the second time; at most `GRAPH_CACHE_SIZE` captures are kept, and
once that many are held an unseen key runs eagerly, so a miss never costs more than eager sampling
(a new lambda per call never captures). Captures whose networks changed since are released when a
new key arrives. `graph_stats()` counts replays, captures and eager runs. A lock serialises the
cache and the replays (their static buffers are shared); eager runs go on outside it.

Leave `cuda_graph` off where the GPU is already saturated (large batches or large networks: the
launch overhead a graph removes is then a small share, and Protenix measured graphs at 0.74x there),
for a signature used once or twice, and for networks with data-dependent python control flow.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import types
import warnings
import weakref
from collections import Counter, OrderedDict

import torch

from .backends import BACKENDS, FLAG_CLEAR, draw_key, make_steps
from .loop import Run

#: most captured sampling loops kept at once; beyond it, unseen signatures run eagerly
GRAPH_CACHE_SIZE = 4
_SEEN_SIZE = 256  # keys seen once and not captured (yet), most recent kept
_LOCK = threading.RLock()
_GRAPHS: "OrderedDict[tuple, _Captured]" = OrderedDict()
_SEEN: "OrderedDict[tuple, list]" = OrderedDict()  # key -> weak references to its anchors
_FAILED: "OrderedDict[tuple, None]" = OrderedDict()  # keys whose capture failed: eager from then on
_STATS: Counter = Counter()
_MAX_DEPTH = 4
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def graph_stats() -> dict:
    """Counts since the last `release_graphs()`: replays (hits), captures, eager runs of a key seen
    for the first time (eager_first), while the cache was full (eager_full) or whose capture failed
    (eager_uncapturable, warned once), captures released because their networks changed
    (released_stale), and the captures now held (cached)."""
    with _LOCK:
        keys = ("replays", "captures", "eager_first", "eager_full", "eager_uncapturable", "released_stale")
        return {**{k: _STATS[k] for k in keys}, "cached": len(_GRAPHS)}


def release_graphs() -> int:
    """Release every captured sampling loop and reset the statistics; returns how many were released."""
    with _LOCK:
        n = len(_GRAPHS)
        _GRAPHS.clear()
        _SEEN.clear()
        _FAILED.clear()
        _STATS.clear()
    if n and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n


def cached_graphs() -> list[tuple]:
    """The keys of the captured loops now held, least recently used first."""
    with _LOCK:
        return list(_GRAPHS)


# --- what a graph read of a network -------------------------------------------------------------

def _tensor_key(t: torch.Tensor) -> tuple:
    return ("tensor", t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device, t._version)


def _module_key(m: torch.nn.Module, out: list, seen: set, anchors: list) -> None:
    out.append(("module", id(m)))
    anchors.append(m)
    for sub in m.modules():
        if id(sub) in seen and sub is not m:
            continue
        seen.add(id(sub))
        out.append(("sub", id(sub), sub.training))
        for t in itertools.chain(sub._parameters.values(), sub._buffers.values()):
            if t is not None:
                out.append(_tensor_key(t))
        for k, v in vars(sub).items():  # plain attributes: cached tensors, mode flags
            if isinstance(v, torch.Tensor):
                out.append((k, _tensor_key(v)))
            elif isinstance(v, _SCALARS):
                out.append((k, v))


def _cell(c):
    try:
        return c.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return None


def _walk(obj, out: list, seen: set, depth: int, anchors: list) -> None:
    """Append to `out` what a graph read of obj; objects whose id() went in are appended to `anchors`."""
    if isinstance(obj, _SCALARS):
        out.append(("value", obj))
        return
    if id(obj) in seen or depth > _MAX_DEPTH or isinstance(obj, (types.ModuleType, type)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(_tensor_key(obj))
    elif isinstance(obj, torch.nn.Module):
        _module_key(obj, out, seen, anchors)
    elif isinstance(obj, functools.partial):
        out.append(("partial", id(obj)))
        anchors.append(obj)
        for v in (obj.func, *obj.args, *obj.keywords.values()):
            _walk(v, out, seen, depth + 1, anchors)
    elif isinstance(obj, types.MethodType):
        out.append(("method", id(obj.__func__)))
        _walk(obj.__self__, out, seen, depth + 1, anchors)
        _walk(obj.__func__, out, seen, depth + 1, anchors)
    elif isinstance(obj, types.FunctionType):
        out.append(("function", id(obj)))
        anchors.append(obj)
        reach = [_cell(c) for c in obj.__closure__ or ()]
        reach += [obj.__globals__[n] for n in obj.__code__.co_names if n in obj.__globals__]
        reach += list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
        for v in reach:
            _walk(v, out, seen, depth + 1, anchors)
    elif isinstance(obj, (list, tuple, dict)):
        out.append((type(obj).__name__, id(obj), len(obj)))
        anchors.append(obj)
        for v in (obj.values() if isinstance(obj, dict) else obj):
            if isinstance(v, (torch.Tensor, torch.nn.Module, types.FunctionType, functools.partial) + _SCALARS):
                _walk(v, out, seen, depth + 1, anchors)
    elif hasattr(obj, "__dict__"):  # a callable object or a bound method's instance: its attributes
        out.append(("object", id(obj)))
        anchors.append(obj)
        for v in vars(obj).values():
            if not isinstance(v, (list, tuple, dict)) or depth == 0:
                _walk(v, out, seen, depth + 1, anchors)


def net_key(fn, anchors: list | None = None) -> tuple:
    """What a captured graph read of the network `fn` (see the module docstring); None gives ().

    The objects whose identity the key holds are appended to `anchors`: while they live, their ids
    cannot be reused by other objects, so holding them keeps the key meaningful.
    """
    out: list = []
    if fn is not None:
        _walk(fn, out, set(), 0, [] if anchors is None else anchors)
    return tuple(out)


def graph_key(spec_name, shape, dtype, device, backend, ts, options, sde, denoise_last, nets,
              anchors: list | None = None) -> tuple:
    autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)) \
        if device.type in ("cuda", "cpu") else None
    opts = tuple(sorted((k, v) for k, v in options.items() if k != "proj_fn"))
    return (spec_name, tuple(shape), dtype, device, backend, ts.numel() - 1, float(ts[0]), float(ts[-1]), sde,
            bool(denoise_last), opts, autocast, tuple(net_key(f, anchors) for f in nets))


def _weak(anchors: list) -> list:
    refs = []
    for a in anchors:
        try:
            refs.append(weakref.ref(a))
        except TypeError:  # not weakly referenceable (a list, a dict): its id may be reused unseen
            pass
    return refs


# --- capture and replay -------------------------------------------------------------------------

class _Captured:
    """One captured loop: its planned run on the static input, its noise input (key or generator), the
    networks it read (held, so that their ids in the key cannot be reused while it lives)."""

    def __init__(self, run: Run, x_in, noise_key, generator, nets, net_keys, anchors):
        self.run, self.x_in, self.noise_key, self.generator = run, x_in, noise_key, generator
        self.nets, self.net_keys, self.anchors = nets, net_keys, anchors
        self.graph, self.x_out, self.nfe = None, None, 0


def _capture(entry: _Captured) -> None:
    """Record the loop into a CUDA graph (warmed up by the eager run of the key's first sighting)."""
    run = entry.run
    graph = torch.cuda.CUDAGraph()
    if entry.generator is not None:  # torch backend: its noise generator becomes graph-safe
        graph.register_generator_state(entry.generator)
    with torch.cuda.graph(graph):
        if run.flag is not None:
            run.flag.fill_(FLAG_CLEAR)  # reset inside the graph: every replay starts clean
        entry.x_out = run.spec.body(run, entry.x_in)
    entry.graph = graph


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """Run on a side stream of `device` (as torch.cuda.graphs asks of warm-up), then join the current one."""
    if device.type != "cuda":
        yield
        return
    cur, side = torch.cuda.current_stream(device), torch.cuda.Stream(device=device)
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        yield
    cur.wait_stream(side)


def _seed_int(seed, generator, device) -> int:
    """A python seed for a graph's own generator (torch backend): `seed`, or one drawn from `generator`."""
    if seed is not None:
        return seed
    if generator is not None:
        return int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    return torch.Generator().seed()


def _build(spec, shape, dtype, device, backend, ts, options, sde, denoise_last, nets, net_keys, anchors) -> _Captured:
    x_in = torch.empty(shape, dtype=dtype, device=device)
    if BACKENDS[backend].keyed:  # the key is a device input: a new seed needs no new capture
        noise_key, gen = torch.zeros((), dtype=torch.int64, device=device), None
        steps = make_steps(backend, device, seed=noise_key)
    else:
        noise_key, gen = None, torch.Generator(device=device)
        steps = make_steps(backend, device, generator=gen)
    entry = _Captured(Run(spec, x_in, ts, options, sde, denoise_last, steps, nets[0]), x_in, noise_key, gen, nets,
                      net_keys, anchors)
    _capture(entry)
    entry.nfe = entry.run.nfe
    return entry


def _replay(entry: _Captured, shape, dtype, device, sde, seed, generator):
    if entry.generator is not None:
        entry.generator.manual_seed(_seed_int(seed, generator, device))
        entry.x_in.copy_(sde.prior_sampling(shape, generator=entry.generator, device=device, dtype=dtype))
    else:
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed) if seed is not None else generator.seed()
        entry.x_in.copy_(sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype))
        entry.noise_key.copy_(draw_key(generator, device))
    entry.run.mark_noise()  # a failed replay is re-run eagerly from here
    entry.graph.replay()
    entry.run.finish(entry.x_out)
    return entry.x_out.clone(), entry.nfe


def _release_stale() -> None:
    for k, e in list(_GRAPHS.items()):
        if tuple(net_key(f) for f in e.nets) != e.net_keys:
            del _GRAPHS[k]
            _STATS["released_stale"] += 1


def sample_graph(spec, score_fn, shape, dtype, device, backend, ts, options, sde, denoise_last, seed, generator,
                 eager):
    """`sample(..., cuda_graph=True)` once its arguments are checked; `eager()` runs the same call eagerly."""
    if torch.is_autocast_enabled(device.type) and torch.is_autocast_cache_enabled():
        raise ValueError("cuda_graph=True under torch.autocast with its weight cache: a replay would read casts freed "
                         "when the autocast region ends; use torch.autocast(..., cache_enabled=False)")
    nets = (score_fn, options.get("proj_fn"))
    with _device_guard(device):
        anchors: list = []
        key = graph_key(spec.name, shape, dtype, device, backend, ts, options, sde, denoise_last, nets, anchors)
        with _LOCK:
            entry = _GRAPHS.get(key)
            if entry is None:
                _release_stale()
                # A key counts as seen only while the objects whose ids it holds live: a new lambda per
                # call may reuse a dead one's id, and must not be mistaken for a second sighting.
                refs = _SEEN.get(key)
                if refs is None or any(r() is None for r in refs):
                    _SEEN[key] = _weak(anchors)
                    while len(_SEEN) > _SEEN_SIZE:
                        _SEEN.popitem(last=False)
                    action = "eager_first"
                elif len(_GRAPHS) >= max(1, GRAPH_CACHE_SIZE) or key in _FAILED:
                    action = "eager_full" if key not in _FAILED else "eager_uncapturable"
                else:
                    try:
                        entry = _build(spec, shape, dtype, device, backend, ts, options, sde, denoise_last, nets,
                                       key[-1], anchors)
                    except Exception as e:  # noqa: BLE001 - a capture-only failure: eager from now on, said once
                        _FAILED[key] = None
                        while len(_FAILED) > _SEEN_SIZE:
                            _FAILED.popitem(last=False)
                        warnings.warn(f"cuda_graph=True: the {spec.name} loop could not be captured "
                                      f"({type(e).__name__}: {e}); this signature runs eagerly", RuntimeWarning,
                                      stacklevel=4)
                        action = "eager_uncapturable"
                    else:
                        del _SEEN[key]
                        _GRAPHS[key] = entry
                        _STATS["captures"] += 1
            else:
                _GRAPHS.move_to_end(key)
                _STATS["replays"] += 1
            if entry is not None:
                return _replay(entry, shape, dtype, device, sde, seed, generator)
            _STATS[action] += 1
        if not BACKENDS[backend].keyed:  # noise as a replay draws it: a generator seeded like the graph's
            g = torch.Generator(device=device)
            generator = g.manual_seed(_seed_int(seed, generator, device))
        with _side_stream(device):  # the first sighting's run is the warm-up of a later capture
            x, n = eager(generator)
        if device.type == "cuda":
            x.record_stream(torch.cuda.current_stream(device))
        return x, n


__all__ = ["GRAPH_CACHE_SIZE", "graph_stats", "release_graphs", "cached_graphs", "net_key", "graph_key",
           "sample_graph"]
