"""vit_jax_ft: fine-tune Vision Transformers in JAX/Flax with the official recipe."""
import os

# tf.data only preprocesses images here: without these, TensorFlow prints its start-up banners
# (oneDNN notices through absl's C++ logger) on every import. A user's own setting wins.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
