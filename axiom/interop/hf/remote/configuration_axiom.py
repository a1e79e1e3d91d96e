"""Configuration of Axiom-Dense for Hugging Face transformers (remote code, written next to the weights).

Self-contained: imports only transformers. Field names are Axiom's own (`d_model`, `n_layers`, ...);
`attribute_map` gives the standard names (`hidden_size`, `num_hidden_layers`, ...) that tools read.
"""

from transformers import PretrainedConfig


class AxiomConfig(PretrainedConfig):
    model_type = "axiom"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "ffn_dim",
        "rms_norm_eps": "norm_eps",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(
        self,
        vocab_size: int = 100277,
        d_model: int = 1024,
        n_layers: int = 24,
        n_heads: int = 16,
        n_kv_heads: int = 8,
        head_dim: int = 64,
        ffn_dim: int = 2816,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_seq_len: int = 1024,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int = 100257,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.ffn_dim = ffn_dim
        self.norm_eps = norm_eps
        self.rope_theta = rope_theta
        self.max_seq_len = max_seq_len
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.use_cache = use_cache
        super().__init__(**kwargs)
