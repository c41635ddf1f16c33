"""Names that passes generate, and how a later pass finds them. Not a pass: it rewrites nothing.

Two rules make generated names safe in a graph whose tensors the user named:

* Every generated name comes from a `NameAllocator` built from the graph at hand. A *scope*
  (`NameAllocator.scope`) is a prefix P such that no existing tensor or node name starts
  with "P/" (`"<conv>/gf"`, or `"<conv>/gf~1"` when the user already has a
  `"<conv>/gf/g_pool"`), so every name under it is new by construction.
* A pass that hands tensors to a later pass publishes the scope it got in
  `Plan.generated` (a `GeneratedNames`); the later pass asks for it there instead of
  rebuilding the name from an f-string. Role names inside a scope (`G_POOL`, `X_POOL`, ...)
  are the constants below.

ORT's own conventions (gradient tensors end in `_grad`, gradient nodes are named after their
forward node plus `_Grad/`) are facts about the gradient builder, also kept here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

# ORT names every gradient tensor "<tensor>_grad" and every gradient node "<forward node>_Grad/...".
GRADIENT_SUFFIX = "_grad"
GRADIENT_NODE_MARK = "_Grad/"

# Scope separator and the mark that makes a taken scope fresh ("<scope>~1", "<scope>~2", ...).
SEPARATOR = "/"
_RETRY_MARK = "~"


class NameAllocator:
    """Hands out tensor/node names and scopes that no tensor or node of `graph` uses yet.

    Built once per pass from the graph it rewrites; names it hands out count as taken.
    """

    def __init__(self, graph: gs.Graph) -> None:
        self._taken: set[str] = {name for name in graph.tensors()}
        self._taken.update(node.name for node in graph.nodes if node.name)
        for node in graph.nodes:
            self._taken.update(t.name for t in (*node.inputs, *node.outputs) if t is not None and t.name)
        self._scopes: set[str] = set()

    def is_taken(self, name: str) -> bool:
        return name in self._taken

    def claim(self, name: str) -> str:
        """Take exactly `name`; an internal error if anything already uses it."""
        if name in self._taken:
            raise RuntimeError(f"generated name {name!r} is already used in the graph")
        self._taken.add(name)
        return name

    def fresh(self, preferred: str) -> str:
        """`preferred` if unused, else `preferred~1`, `preferred~2`, ... (the first unused)."""
        candidate, attempt = preferred, 0
        while candidate in self._taken or self._inside_scope(candidate):
            attempt += 1
            candidate = self._variant(preferred, attempt)
        self._taken.add(candidate)
        return candidate

    def scope(self, preferred: str) -> str:
        """A prefix P such that no name in use starts with "P/" and no scope handed out is, holds or
        lies inside P (P itself may be a name in use, e.g. the node a pass rewrites).

        Names "P/<anything>" are then new, whoever made them; an Emitter relies on that.
        """
        candidate, attempt = preferred, 0
        while self._scope_clashes(candidate):
            attempt += 1
            candidate = self._variant(preferred, attempt)
        self._scopes.add(candidate)
        return candidate

    def _variant(self, preferred: str, attempt: int) -> str:
        """The `attempt`-th alternative to `preferred`: marked at the end, or, where `preferred`
        lies inside a scope handed out (no ending leaves it), marked in its first component."""
        if self._inside_scope(preferred):
            head, _, rest = preferred.partition(SEPARATOR)
            return f"{head}{_RETRY_MARK}{attempt}{SEPARATOR}{rest}"
        return f"{preferred}{_RETRY_MARK}{attempt}"

    def _scope_clashes(self, candidate: str) -> bool:
        # A scope may equal a name in use (a node's own name as the scope of its rewrite): only
        # names "P/..." are handed out under it.
        inner = candidate + SEPARATOR
        if candidate in self._scopes or self._inside_scope(candidate):
            return True
        return any(name.startswith(inner) for name in self._taken) or any(
            scope.startswith(inner) for scope in self._scopes
        )

    def _inside_scope(self, name: str) -> bool:
        # A name inside a scope handed out belongs to that scope's emitter.
        return any(name.startswith(scope + SEPARATOR) for scope in self._scopes)


def scoped(scope: str, local: str) -> str:
    """The full name of `local` inside `scope`."""
    return f"{scope}{SEPARATOR}{local}"


# --------------------------------------------------------------------------------------------
# Gradient filtering: the tensors gradient_filter emits that later passes read
# --------------------------------------------------------------------------------------------

FILTER_SCOPE = "gf"  # preferred scope of conv C's filter ops: "C/gf"
X_POOL = "x_pool"  # x~, N x C_in x p_h x p_w: the pooled input the filtered backward keeps
G_POOL = "g_pool"  # g^, N x C_out x p_h x p_w: the pooled output gradient (see geometry.g_pool_holds_sums)
GX_HAT = "gx_hat"  # W~^T g^ at patch resolution, before the upsample to grad_x
UPSAMPLE = "up"  # the upsample chain: the node "up" and the nodes "up_*"


def preferred_filter_scope(conv: str) -> str:
    return f"{conv}{SEPARATOR}{FILTER_SCOPE}"


def in_role(scope: str, role: str, node_name: str) -> bool:
    """Whether `node_name` is the node `role` of `scope` or one of its helper nodes "role_*"."""
    full = scoped(scope, role)
    return node_name == full or node_name.startswith(full + "_")


def in_scope(scope: str, name: str) -> bool:
    return name.startswith(scope + SEPARATOR)


RELU_MASK = "relu_mask"  # activation_mask's bool mask of activation A: preferably "A/relu_mask"


def preferred_mask_name(activation: str) -> str:
    return scoped(activation, RELU_MASK)


# --------------------------------------------------------------------------------------------
# Row tiling: band nodes, which row_recompute and the memory model find again
# --------------------------------------------------------------------------------------------

ROW_TILE_SCOPE = "rowtile"  # preferred scope of chain X's band nodes: "rowtile/X"
BAND = "band"  # band j's nodes live in "<chain scope>/band<j>/"
ENTRY = "entry"  # a band's Slice of the chain entry: "<band scope>/entry"
RECOMPUTE_SCOPE = "backward"  # row_recompute's nodes of a chain: "<chain scope>/backward/..."
RECOMPUTED = "recompute"  # row_recompute's copy of band node X: "X/recompute"


def preferred_chain_scope(chain: str) -> str:
    return f"{ROW_TILE_SCOPE}{SEPARATOR}{chain}"


def band_scope(chain_scope: str, band: int) -> str:
    return scoped(chain_scope, f"{BAND}{band}")


@dataclass(frozen=True)
class BandNode:
    """Where a node belongs: chain `chain` (its exit tensor's name), band `band`."""

    chain: str
    band: int


def parse_band(node_name: str, chain_scopes: dict[str, str]) -> BandNode | None:
    """The band `node_name` belongs to, given chain name -> chain scope; None if none.

    Also matches ORT's gradient nodes of band nodes ("<band node>_Grad/..."), which start
    with the band scope too.
    """
    for chain, scope in chain_scopes.items():
        head = scoped(scope, BAND)
        if not node_name.startswith(head):
            continue
        digits, rest = _leading_digits(node_name[len(head) :])
        if digits and rest.startswith(SEPARATOR):
            return BandNode(chain, int(digits))
    return None


def _leading_digits(text: str) -> tuple[str, str]:
    end = 0
    while end < len(text) and text[end].isdigit():
        end += 1
    return text[:end], text[end:]


# --------------------------------------------------------------------------------------------
# What passes published, for later passes (lives on the Plan of one compile)
# --------------------------------------------------------------------------------------------


@dataclass
class GeneratedNames:
    """Scopes and tensors passes generated that later passes look up (see the module docstring).

    filter_scopes: filtered conv node -> scope of its gradient-filter ops (gradient_filter).
    relu_masks: activation tensor -> the bool mask tensor that replaces it (activation_mask).
    chain_scopes: tiled chain (exit tensor) -> scope of its band nodes (row_tiling).
    recompute_markers: tiled chain -> a node row_recompute added for it (present: already rewritten).
    """

    filter_scopes: dict[str, str] = field(default_factory=dict)
    relu_masks: dict[str, str] = field(default_factory=dict)
    chain_scopes: dict[str, str] = field(default_factory=dict)
    recompute_markers: dict[str, str] = field(default_factory=dict)

    def filter_tensor(self, conv: str, role: str) -> str | None:
        """Name of gradient_filter's tensor `role` (X_POOL, G_POOL, GX_HAT) for `conv`, if it filtered it."""
        scope = self.filter_scopes.get(conv)
        return scoped(scope, role) if scope is not None else None

    def band_of(self, node_name: str) -> BandNode | None:
        return parse_band(node_name, self.chain_scopes)
