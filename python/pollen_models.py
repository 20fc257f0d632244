"""PyTorch equivalents of Pollen's built-in model families.

Every Pollen checkpoint (``runs/<run>/models/round-NNNN.safetensors``) holds named f32 tensors
in PyTorch layout, and in its safetensors header the run's task manifest (model family and
settings, task, input shape, classes), the run id and the round. This module rebuilds the
``torch.nn.Module`` the manifest describes, with the same parameter names and the same
forward pass as Pollen's burn models, so that::

    import safetensors.torch, pollen_models
    model, manifest = pollen_models.load_checkpoint("runs/<run>/models/round-0050.safetensors")
    # or, with a module of your own:
    model = pollen_models.from_manifest(manifest)
    model.load_state_dict(safetensors.torch.load_file(path))   # strict: every name, no more

A model takes what Pollen's take: a batch of flattened examples ``[batch, prod(shape)]``
(MNIST pixels scaled as Pollen's loader does, see ``mnist_images``), and returns logits per
class (classification), the scaled target (regression; see ``unscale_target``) or the
reconstruction (anomaly detection). A checkpoint of a TorchScript run loads into the user's
own module the same way: its names are the module's ``state_dict()`` keys.

Families (``model.family`` in the manifest), as in ``train/src/model/``:

- ``mlp``: ``fc1 .. fcN`` Linear layers, the activation between them.
- ``cnn1d``: ``conv1 .. convK`` Conv1d ('same' padding), each followed by the activation and a
  max-pool, a mean over time, then ``fc1 .. fcN``.
- ``cnn2d``: ``conv1 .. convK`` Conv2d ('same' padding), activation, max-pool, flattened (channel,
  row, column order), then ``fc1 .. fcN``. McMahan et al.'s MNIST CNN is the defaults.
- ``rnn``: stacked GRU or LSTM layers ``rnn1 .. rnnK`` written gate by gate as burn writes them
  (each gate an ``input_transform`` and a ``hidden_transform`` Linear; GRU with the reset gate
  applied after the hidden transform), the last hidden state, then ``fc1 .. fcN``.
- ``autoencoder``: ``enc1 .. encK`` then ``dec1 .. decK``, the code activated too.
"""

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_ACTIVATIONS = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
}


def _activation(name):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; Pollen's are {sorted(_ACTIVATIONS)}") from None


class _Layers(nn.Module):
    """Numbered sub-modules ``<stem>1 .. <stem>N``: the names Pollen's checkpoints use."""

    def _add(self, stem, modules):
        names = []
        for i, m in enumerate(modules, start=1):
            name = f"{stem}{i}"
            self.add_module(name, m)
            names.append(name)
        return names

    def _run(self, names, x, activation, dropout, last_activated=False):
        for i, name in enumerate(names):
            x = getattr(self, name)(x)
            if i + 1 < len(names) or last_activated:
                x = F.dropout(activation(x), dropout, self.training)
        return x


def _dense(widths):
    return [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]


def _convs(conv, c_in, channels, kernel_size):
    """Convolutions with 'same' padding (odd kernels), as Pollen's."""
    widths = [c_in, *channels]
    return [conv(a, b, kernel_size, padding=kernel_size // 2) for a, b in zip(widths, widths[1:])]


class Mlp(_Layers):
    def __init__(self, inputs, outputs, hidden=(64, 64), activation="relu", dropout=0.0):
        super().__init__()
        self.fcs = self._add("fc", _dense([inputs, *hidden, outputs]))
        self.activation, self.dropout = _activation(activation), dropout

    def forward(self, x):
        return self._run(self.fcs, x, self.activation, self.dropout)


class Cnn1d(_Layers):
    def __init__(self, input_shape, outputs, channels=(32, 64), kernel_size=5, pool=2, hidden=(64,),
                 activation="relu", dropout=0.0):
        super().__init__()
        self.shape = tuple(input_shape)
        self.convs = self._add("conv", _convs(nn.Conv1d, self.shape[0], channels, kernel_size))
        c_in = channels[-1]
        self.fcs = self._add("fc", _dense([c_in, *hidden, outputs]))
        self.pool = pool
        self.activation, self.dropout = _activation(activation), dropout

    def forward(self, x):
        x = x.reshape(x.shape[0], *self.shape)
        for name in self.convs:
            x = self.activation(getattr(self, name)(x))
            if self.pool > 1:
                x = F.max_pool1d(x, self.pool)
        x = x.mean(dim=2)
        return self._run(self.fcs, x, self.activation, self.dropout)


class Cnn2d(_Layers):
    def __init__(self, input_shape, outputs, channels=(32, 64), kernel_size=5, pool=2, hidden=(512,),
                 activation="relu", dropout=0.0):
        super().__init__()
        self.shape = tuple(input_shape)
        c_in, h, w = self.shape
        self.convs = self._add("conv", _convs(nn.Conv2d, c_in, channels, kernel_size))
        for _ in channels:
            h, w = h // pool, w // pool
        self.fcs = self._add("fc", _dense([channels[-1] * h * w, *hidden, outputs]))
        self.pool = pool
        self.activation, self.dropout = _activation(activation), dropout

    def forward(self, x):
        x = x.reshape(x.shape[0], *self.shape)
        for name in self.convs:
            x = self.activation(getattr(self, name)(x))
            if self.pool > 1:
                x = F.max_pool2d(x, self.pool)
        x = x.flatten(1)
        return self._run(self.fcs, x, self.activation, self.dropout)


class _Gate(nn.Module):
    """burn's ``GateController``: ``input_transform(x) + hidden_transform(h)``."""

    def __init__(self, d_input, d_hidden):
        super().__init__()
        self.input_transform = nn.Linear(d_input, d_hidden)
        self.hidden_transform = nn.Linear(d_hidden, d_hidden)

    def forward(self, x, h):
        return self.input_transform(x) + self.hidden_transform(h)


class Gru(nn.Module):
    """burn's GRU (``reset_after = true``): n = tanh(W_in x + b_in + r * (W_hn h + b_hn))."""

    def __init__(self, d_input, d_hidden):
        super().__init__()
        self.d_hidden = d_hidden
        self.update_gate = _Gate(d_input, d_hidden)
        self.reset_gate = _Gate(d_input, d_hidden)
        self.new_gate = _Gate(d_input, d_hidden)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.d_hidden)
        out = []
        for t in range(x.shape[1]):
            xt = x[:, t]
            z = torch.sigmoid(self.update_gate(xt, h))
            r = torch.sigmoid(self.reset_gate(xt, h))
            n = torch.tanh(self.new_gate.input_transform(xt) + r * self.new_gate.hidden_transform(h))
            h = (1 - z) * n + z * h
            out.append(h)
        return torch.stack(out, dim=1)


class Lstm(nn.Module):
    """burn's LSTM: input, forget, output and cell gates, each a ``_Gate``."""

    def __init__(self, d_input, d_hidden):
        super().__init__()
        self.d_hidden = d_hidden
        self.input_gate = _Gate(d_input, d_hidden)
        self.forget_gate = _Gate(d_input, d_hidden)
        self.output_gate = _Gate(d_input, d_hidden)
        self.cell_gate = _Gate(d_input, d_hidden)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.d_hidden)
        c = x.new_zeros(x.shape[0], self.d_hidden)
        out = []
        for t in range(x.shape[1]):
            xt = x[:, t]
            i = torch.sigmoid(self.input_gate(xt, h))
            f = torch.sigmoid(self.forget_gate(xt, h))
            o = torch.sigmoid(self.output_gate(xt, h))
            g = torch.tanh(self.cell_gate(xt, h))
            c = f * c + i * g
            h = o * torch.tanh(c)
            out.append(h)
        return torch.stack(out, dim=1)


class Rnn(_Layers):
    def __init__(self, input_shape, outputs, cell="gru", hidden_size=(32,), hidden=(), activation="relu",
                 dropout=0.0):
        super().__init__()
        self.shape = tuple(input_shape)
        kind = {"gru": Gru, "lstm": Lstm}.get(cell)
        if kind is None:
            raise ValueError(f"unknown cell {cell!r}; Pollen's are gru and lstm")
        d_in = self.shape[0]
        rnns = []
        for d_hidden in hidden_size:
            rnns.append(kind(d_in, d_hidden))
            d_in = d_hidden
        self.rnns = self._add("rnn", rnns)
        self.fcs = self._add("fc", _dense([d_in, *hidden, outputs]))
        self.activation, self.dropout = _activation(activation), dropout

    def forward(self, x):
        channels, length = self.shape
        # Examples are channel-major; the recurrent layers read [batch, time, channels].
        x = x.reshape(x.shape[0], channels, length).transpose(1, 2)
        for name in self.rnns:
            x = getattr(self, name)(x)
        x = F.dropout(x[:, -1], self.dropout, self.training)
        return self._run(self.fcs, x, self.activation, self.dropout)


class Autoencoder(_Layers):
    def __init__(self, inputs, hidden=(32, 8), activation="relu", dropout=0.0):
        super().__init__()
        widths = [inputs, *hidden]
        self.encs = self._add("enc", _dense(widths))
        self.decs = self._add("dec", _dense(widths[::-1]))
        self.activation, self.dropout = _activation(activation), dropout

    def forward(self, x):
        x = self._run(self.encs, x, self.activation, self.dropout, last_activated=True)
        return self._run(self.decs, x, self.activation, 0.0)


PRESETS = {
    "mnist-2nn": {"family": "mlp", "hidden": [200, 200]},
    "mnist-cnn": {"family": "cnn2d"},
}


def _outputs(task, inputs):
    kind = task.get("kind", "classification")
    if kind == "classification":
        classes = task.get("classes")
        if not classes:
            raise ValueError("a classification manifest without its classes")
        return len(classes)
    if kind == "regression":
        return 1
    if kind == "anomaly":
        return inputs
    raise ValueError(f"unknown task kind {kind!r}")


def from_manifest(manifest):
    """The module a Pollen task manifest (a dict, or its JSON) describes, untrained."""
    if isinstance(manifest, (str, bytes)):
        manifest = json.loads(manifest)
    task, model = manifest["task"], manifest["model"]
    if isinstance(model, str):
        model = PRESETS[model]
    settings = {k: v for k, v in model.items() if k != "family"}
    shape = task.get("shape")
    if not shape:
        raise ValueError("the manifest's task has no input shape")
    inputs = math.prod(shape)
    outputs = _outputs(task, inputs)
    family = model["family"]
    if family == "mlp":
        return Mlp(inputs, outputs, **settings)
    if family == "cnn1d":
        return Cnn1d(shape, outputs, **settings)
    if family == "cnn2d":
        return Cnn2d(shape, outputs, **settings)
    if family == "rnn":
        return Rnn(shape, outputs, **settings)
    if family == "autoencoder":
        return Autoencoder(inputs, **settings)
    raise ValueError(f"family {family!r} has no built-in module here (a TorchScript run's checkpoint "
                     "loads into the user's own module)")


def checkpoint_metadata(path):
    """The header of a Pollen checkpoint: ``pollen.manifest`` (JSON), ``pollen.run_id``,
    ``pollen.round``, ``pollen.task_sha256``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_checkpoint(path, strict=True):
    """Rebuilds the checkpoint's model from its header and loads its weights: ``(module, manifest)``."""
    import safetensors.torch

    meta = checkpoint_metadata(path)
    if "pollen.manifest" not in meta:
        raise ValueError(f"{path}: no pollen.manifest in the safetensors header (written before Pollen "
                         "recorded its manifests in checkpoints?)")
    manifest = json.loads(meta["pollen.manifest"])
    model = from_manifest(manifest)
    model.load_state_dict(safetensors.torch.load_file(str(path)), strict=strict)
    model.eval()
    return model, manifest


def unscale_target(manifest, y):
    """A regression model predicts the target scaled by the run's fitted statistics; this undoes it."""
    scaling = (manifest.get("fitted") or {}).get("targets")
    if not scaling:
        return y
    std = scaling["std"][0] or 1.0
    return y * std + scaling["mean"][0]


def mnist_images(path):
    """MNIST IDX images (``.gz`` or not) flattened and scaled as Pollen's loader scales them."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    n, rows, cols = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    x = torch.frombuffer(bytearray(data[16:16 + n * rows * cols]), dtype=torch.uint8)
    return ((x.float() / 255.0 - MNIST_MEAN) / MNIST_STD).reshape(n, rows * cols)


def mnist_labels(path):
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[4:8], "big")
    return torch.frombuffer(bytearray(data[8:8 + n]), dtype=torch.uint8).long()


@torch.no_grad()
def accuracy(model, x, y, batch_size=1000):
    """Top-1 accuracy of ``model`` on ``x`` (flattened examples) and ``y`` (class indices)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]).sum().item()
    return correct / len(x)
