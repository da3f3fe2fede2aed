"""The receiving half of weight sync: a vLLM worker extension.

vLLM mixes this class into its Worker (``LLM(worker_extension_cls=...)``), and the rollout
worker calls it with ``llm.collective_rpc``. The engine runs in-process (uni executor, no V1
multiprocessing), so the tensors arrive by reference, not serialised.

Method names carry an ``rlrelay_`` prefix because vLLM's Worker already has methods such as
``update_weights`` that an extension must not shadow.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class WeightReceiverExtension:
    """Loads new weights into the running engine's model, in place."""

    def rlrelay_load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Reload every given tensor (HF checkpoint names); returns how many were given.

        ``reload_weights`` re-runs the loader's per-layer post-processing, which the CPU
        backend needs: it repacks linear weights for oneDNN at load time and leaves
        ``layer.weight`` empty, so copying into parameters directly would half-update the
        model (DESIGN, "Weights into a running engine").
        """
        tensors = list(named_tensors)
        self.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        model = self.model_runner.get_model()
        if self.model_runner.model_config.hf_text_config.tie_word_embeddings:
            # With tied embeddings the checkpoint has no lm_head.weight, so the reload never
            # re-processes lm_head and its packed copy keeps the OLD weights (log-probs off by
            # tens of nats, measured). Re-pack it from the freshly loaded shared weight.
            lm_head = model.lm_head
            lm_head.quant_method.process_weights_after_loading(lm_head)
        return len(tensors)
