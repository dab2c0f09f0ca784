"""
The compact export as a transformers model: register_with_transformers() registers the krony_gpt2
model type with the Auto classes, so that

    import krony_hf; krony_hf.register_with_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(compact_dir)

returns a model that keeps the Kronecker factors, with transformers' KV cache, attention_mask and
position_ids, so generate() and pipeline("text-generation") work on left-padded batches. Nothing is
loaded from the directory but JSON and safetensors: no trust_remote_code. A directory whose tensors
do not match its config is refused (transformers would only warn and initialize the missing ones at
random).
"""

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin, PretrainedConfig, \
    PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

import checkpoint
import compress
import tokenizer
from checkpoint import FORMAT, FORMAT_VERSION, CheckpointError
from model import GPT, GPTConfig, KronLinear, check_finite_tensors, check_sizes

# the output's cache field: `cache` from transformers 5.24 on, `past_key_values` before
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class KronyGPT2Config(PretrainedConfig):
    model_type = FORMAT

    def __init__(self, gpt=None, factors=None, hf_config=None, format_version=FORMAT_VERSION, **kw):
        hc = hf_config or {}
        kw.setdefault("bos_token_id", hc.get("bos_token_id", tokenizer.GPT2_EOT))
        kw.setdefault("eos_token_id", hc.get("eos_token_id", tokenizer.GPT2_EOT))
        kw.setdefault("tie_word_embeddings", False)     # the tie lives inside the model (one module)
        use_cache = kw.pop("use_cache", True)
        super().__init__(**kw)
        self.use_cache = use_cache
        self.gpt, self.factors, self.hf_config, self.format_version = gpt or {}, factors or {}, hc, format_version
        g = self.gpt
        # the standard names generation utilities look up
        self.num_hidden_layers, self.hidden_size = g.get("n_layer"), g.get("n_embd")
        self.num_attention_heads, self.vocab_size = g.get("n_head"), g.get("vocab_size")
        self.max_position_embeddings = g.get("block_size")


class TokenEmbedding(torch.nn.Module):
    """What get_input_embeddings() returns: the lookup of the (possibly factored) tied embedding.
    It holds no parameters of its own; weight is the dense matrix, built on demand if factored."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = [gpt]                         # a list: not a submodule
        self.num_embeddings, self.embedding_dim = gpt.config.vocab_size, gpt.config.n_embd

    @property
    def weight(self):
        wte = self.gpt[0].transformer.wte
        return wte.dense_weight() if isinstance(wte, KronLinear) else wte.weight

    def forward(self, input_ids):
        return self.gpt[0].embed(input_ids)


class KronyGPT2LMHeadModel(PreTrainedModel, GenerationMixin):
    config_class = KronyGPT2Config
    base_model_prefix = "krony"
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__(config)
        gcfg = GPTConfig.from_dict(config.gpt)
        gpt = compress.build_student(gcfg, compress.check_plan(config.factors, gcfg))
        self.transformer = gpt.transformer
        self.lm_head = gpt.lm_head               # an untied head (the Llama family's), else None
        self._gpt = [gpt]                        # a list: not a submodule, so keys stay transformer.*
        self._embedding = [TokenEmbedding(gpt)]
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kw):
        path = args[0] if args else kw.get("pretrained_model_name_or_path")
        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):     # before anything is allocated
            check_sizes(path, checkpoint.check_student_config(path, checkpoint.read_config(path)))
        want_info = kw.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kw)
        wrong = {k: v for k, v in info.items() if k != "error_msgs" and v}
        if wrong or info.get("error_msgs"):
            raise CheckpointError(f"{args[0] if args else ''}: the weights do not match the config: "
                                  f"{ {k: sorted(v)[:6] for k, v in wrong.items()} } {info.get('error_msgs') or ''}; "
                                  f"the checkpoint is damaged or was written by other code")
        check_finite_tensors(model.state_dict(), path)
        for m in model.modules():                # rebuild the permutations' inverses (not saved)
            if isinstance(m, KronLinear):
                m.set_permutations(m.rows, m.cols)
        return (model, info) if want_info else model

    def _init_weights(self, module):
        # from_config: GPT-2's init (factors: KronLinear's own); from_pretrained refuses gaps instead.
        # transformers calls this after loading too, on modules it did not mark whole (the
        # permutations' inverses are not saved): leave anything that was loaded untouched.
        if any(getattr(t, "_is_hf_initialized", False) for t in module.parameters(recurse=False)):
            return
        if isinstance(module, KronLinear):
            module.reset_parameters()
        else:
            GPT.init_weights(module)

    def get_input_embeddings(self):
        return self._embedding[0]

    def get_output_embeddings(self):
        return None                              # the head is the tied embedding, inside the model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, logits_to_keep=0, inputs_embeds=None, **kw):
        # transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`
        # (generate() passes `cache=`; earlier releases `past_key_values=`): take either, return both.
        if cache is not None and past_key_values is not None:
            raise ValueError("give the cache as cache or as past_key_values, not both")
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("this model takes input_ids (token ids), not inputs_embeds")
        cache = past_key_values if cache is None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        out = self._gpt[0](input_ids, cache=cache, mask=attention_mask, pos=position_ids,
                           logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            logits = out.logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, **{CACHE_FIELD: cache if use_cache else None})


def register_with_transformers():
    """Register krony_gpt2 with AutoConfig and AutoModelForCausalLM (calling it again is harmless)."""
    AutoConfig.register(FORMAT, KronyGPT2Config, exist_ok=True)
    AutoModelForCausalLM.register(KronyGPT2Config, KronyGPT2LMHeadModel, exist_ok=True)
