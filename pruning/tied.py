r"""Tied weights (HashedNet-style), the static parameterisation DSR's code compares with: ``--sparse
static --tied`` (its ``--tied``; ``parameterized_tensors.py``: ``TiedTensor``).

Every tensor that sparse training would make sparse (:func:`pruning.sparse.sparse_layers`) is instead
drawn from a small vector of free values, its *bank*, through a fixed random index: weight position
j reads ``bank[alloc[j]]``. For a tensor of n weights at density d (``--density`` or the code's
``--initial-sparsity-conv`` / ``-fc``: d = 1 - s):

- the bank has :math:`m = \mathrm{round}(d\,n)` values (Python's ``round``, the code's
  ``TiedTensor.num_weights``); a tensor left with none is refused;
- the index covers the bank uniformly: a random permutation :math:`\pi` of the n positions, and
  :math:`\mathrm{alloc}[\pi_j] = j \bmod m` (the code's ``uniform_coverage`` on shuffled positions),
  so every value is used :math:`\lfloor n/m \rfloor` or :math:`\lceil n/m \rceil` times and the
  free values number exactly m;
- whatever ``--sub-kernel-granularity`` says, values are tied per weight: ``TiedTensor`` reads the
  granularity as a yes/no and the code passes 2 or 4, both yes;
- the bank starts as the code's: a conv's N(0, 2/(k²·C_out)) (its models' ``reset_parameters``
  overwrite ``TiedTensor``'s draw), a linear layer's U(±1/√C_in) with its first value 0
  (``TiedTensor.init_parameters``, which nothing overwrites);
- its gradient is the sum of the gradients of the positions that read it (autograd through
  ``bank[alloc]``), and SGD, with momentum, Nesterov and weight decay, steps the bank.

Here the weights stay the model's ordinary parameters, holding ``bank[alloc]``: after backward every
position's gradient is replaced by the summed gradient of its value (:meth:`TiedWeights.after_backward`),
so every position of a value receives the identical SGD update, weight decay and momentum included,
and the tensor stays exactly tied (tested bit for bit). That is the code's update of the bank.

``--rescale-tied-gradient``: the code divides each bank's gradient by n/m *after*
``optimizer.step()`` (main.py: ``train``), and the next ``zero_grad()`` clears it, so it never
reaches a weight: training is the same with and without it. It is honoured as written (the gradient
left after the step is divided) and changes nothing; results.json records it.

``--L1-loss-coeff c``: the loss gets :math:`c \sum |\mathrm{bank}|` (each free value once; with
``--conv-group-lasso`` a conv's group lasso over the k x k kernels of the full tensor), as the code.

Cost: params = the free values of the tied tensors + every other parameter (the code's
``get_model_size``: the unique entries of ``weight_alloc``); MACs are the dense network's (every
position holds a value). ``pruned.pt`` holds the full tensors (``bank[alloc]``) and counts the same
params.

Only static training ties: the code's rewiring, DeepR and pruning act on ``SparseTensor`` s only
(main.py: ``all_sparse_tensors``, the DeepR loops, ``DynamicNetworkBase.prune``), so with ``--tied``
they do nothing; ``--tied`` with another method is refused.
"""
import torch

from models.export import tied_cost
from utils.errors import UsageError

from .method import PruningMethod
from .sparse import initialize_as_code, is_linear, sparse_layers, sparsity_keys


def tied_count(n: int, density: float) -> int:
    """Free values of a tied tensor of ``n`` weights at ``density``: the code's round(d·n)."""
    return round(density * n)


def hash_index(n: int, values: int, generator: torch.Generator) -> torch.Tensor:
    """The value each of ``n`` positions reads (long, CPU): position ``perm[j]`` reads ``j mod values``
    for a random permutation ``perm``; positions ``perm[:values]`` are each value's first reader."""
    perm = torch.randperm(n, generator=generator)
    alloc = torch.empty(n, dtype=torch.long)
    alloc[perm] = torch.arange(n) % values
    return alloc, perm[:values].clone()


def index_digest(alloc: torch.Tensor) -> int:
    """A checksum of an index (a resumed run must rebuild the same one)."""
    positions = torch.arange(alloc.numel(), device=alloc.device) % 7919 + 1
    return int((alloc * positions).sum())


def check_tied_densities(model, layers, densities: list[float]) -> None:
    """Refuse a density outside (0, 1] or one that leaves a tied tensor without a value (one line)."""
    for record, density in zip(layers, densities):
        if not 0.0 < density <= 1.0:
            raise UsageError(f"--density {density:g}: must be in (0, 1]")
        n = model.get_submodule(record.name).weight.numel()
        if tied_count(n, density) == 0:
            raise UsageError(f"--tied at density {density:g} leaves {record.name} ({n} weights) without a free "
                             f"value (the code's round(d*n) is 0); a density above {0.5 / n:.3g} keeps one")


class TiedWeights(PruningMethod):
    """Static training with every sparse-training tensor tied to a bank of free values (module docstring).

    ``densities``: one per tied tensor; ``seed`` seeds the index (the same on every rank and on resume);
    ``shortcuts``: ResNet50's projection shortcuts are tied too (``--sparse-resnet-downsample``)."""

    name = "tied"
    network_name = "free values per tied tensor"

    def __init__(self, model, densities: list[float], seed: int, *, shortcuts: bool = False,
                 rescale_gradient: bool = False, l1: float = 0.0, group_lasso: bool = False, initialize: bool = True):
        super().__init__(model)
        self.layers = sparse_layers(model, shortcuts)
        self.weights = [model.get_submodule(w.name).weight for w in self.layers]
        self.linear = [is_linear(model, w) for w in self.layers]
        self.start_densities = list(densities)
        self.shortcuts, self.rescale_gradient, self.l1, self.group_lasso = shortcuts, rescale_gradient, l1, group_lasso
        check_tied_densities(model, self.layers, self.start_densities)
        generator = torch.Generator().manual_seed(seed)
        self.values, self.alloc, self.first = [], [], []
        for w, density in zip(self.weights, self.start_densities):
            values = tied_count(w.numel(), density)
            alloc, first = hash_index(w.numel(), values, generator)
            self.values.append(values)
            self.alloc.append(alloc.to(w.device))
            self.first.append(first.to(w.device))
        self.digests = [index_digest(a) for a in self.alloc]
        if initialize:
            self._initialize()

    @torch.no_grad()
    def _initialize(self) -> None:
        initialize_as_code(self.model)
        for record, w, linear, alloc, values in zip(self.layers, self.weights, self.linear, self.alloc, self.values):
            bank = w.new_empty(values)
            if linear:
                bound = 1.0 / record.in_channels ** 0.5
                bank.uniform_(-bound, bound)
                bank[0] = 0.0
            else:
                bank.normal_(0.0, (2.0 / (record.kernel ** 2 * record.out_channels)) ** 0.5)
            w.copy_(bank[alloc].view(w.shape))

    def banks(self) -> list[torch.Tensor]:
        """Each tied tensor's free values (read at each value's first position)."""
        return [w.detach().reshape(-1)[first] for w, first in zip(self.weights, self.first)]

    # -- the engine's hooks ------------------------------------------------------------------

    def changes_gradients(self) -> bool:
        return True

    def loss(self, progress: float) -> torch.Tensor | None:
        if self.l1 == 0:
            return None
        terms = []
        for w, first in zip(self.weights, self.first):
            if self.group_lasso and w.dim() == 4:
                terms.append(torch.sqrt(w.pow(2).sum(-1).sum(-1) + 1e-12).sum())
            else:
                terms.append(w.reshape(-1)[first].abs().sum())
        return self.l1 * torch.stack(terms).sum()

    @torch.no_grad()
    def after_backward(self) -> None:
        """Every position's gradient becomes the summed gradient of the value it reads (the bank's)."""
        for w, alloc, values in zip(self.weights, self.alloc, self.values):
            if w.grad is None:
                continue
            summed = w.grad.new_zeros(values).index_add_(0, alloc, w.grad.reshape(-1))
            w.grad.copy_(summed[alloc].view(w.shape))

    @torch.no_grad()
    def after_step(self, iteration: int) -> None:
        """``--rescale-tied-gradient`` where the code has it: after the step, so no weight sees it."""
        if self.rescale_gradient:
            for w, values in zip(self.weights, self.values):
                if w.grad is not None:
                    w.grad.div_(w.numel() / values)

    # -- what it decides ---------------------------------------------------------------------

    def network_key(self) -> torch.Tensor:
        return torch.tensor(self.values)

    def tied_values(self) -> dict:
        return {record.name: values for record, values in zip(self.layers, self.values)}

    def cost(self, kept: torch.Tensor) -> tuple[int, int]:
        return tied_cost(self.model, self.tied_values())

    # -- state and reporting -----------------------------------------------------------------

    def settings(self) -> dict:
        return {"--tied": True, "--layer-densities": self.start_densities, "--sparse-resnet-downsample": self.shortcuts,
                "--rescale-tied-gradient": self.rescale_gradient, "--L1-loss-coeff": self.l1,
                "--conv-group-lasso": self.group_lasso}

    def state_dict(self) -> dict:
        return dict(settings=self.settings(), digests=list(self.digests), tied_values=self.tied_values(),
                    layers=[r.name for r in self.layers])

    def load_state_dict(self, state: dict) -> list[str]:
        for flag, value in state["settings"].items():
            if self.settings().get(flag) != value:
                raise UsageError(f"the checkpoint's run used {flag} {value}, this command {self.settings().get(flag)}; "
                                 f"resume it with matching flags")
        if list(state["digests"]) != self.digests:
            raise UsageError("the checkpoint's tied index differs from the one this command builds (another seed "
                             "or another version); resume it with the run's own --seed")
        return []

    def results(self) -> dict:
        positions = sum(w.numel() for w in self.weights)
        free = sum(self.values)
        densities = set(self.start_densities)
        out = dict(super().results(), method=self.name, tied=True,
                   density=densities.pop() if len(densities) == 1 else None,
                   density_active=free / positions, tied_values=free, tied_weights_total=positions,
                   layer_densities={r.name: v / w.numel() for r, v, w in zip(self.layers, self.values, self.weights)},
                   rescale_tied_gradient=self.rescale_gradient)
        if len(set(self.start_densities)) > 1:
            for kind, linear in (("density_conv", False), ("density_fc", True)):
                values = {d for d, lin in zip(self.start_densities, self.linear) if lin == linear}
                if values:
                    out[kind] = values.pop()
        out.update(sparsity_keys(out))
        if self.l1:
            out.update(l1_loss_coeff=self.l1, conv_group_lasso=self.group_lasso)
        if self.shortcuts:
            out["sparse_resnet_downsample"] = True
        return out

    def epoch_message(self, epoch: int, results: dict) -> str | None:
        return (f"tied: {results['tied_values']} free values for the {results['tied_weights_total']} weights of "
                f"{len(self.layers)} tied tensors (density {results['density_active']:.4f})")
