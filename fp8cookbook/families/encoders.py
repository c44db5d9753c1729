"""Real configs of the text encoders more than one family uses, each cited: the full-size stand-ins are built from
them (standin.py, `Family.standin`)."""

# black-forest-labs/FLUX.1-dev text_encoder_2/config.json (google/t5-v1_1-xxl encoder); Wan2.2's umt5-xxl is this
# config with its own vocabulary (wan22.py).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
              layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
              tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False)
