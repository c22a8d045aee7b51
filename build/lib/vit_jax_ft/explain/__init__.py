"""What a ViT attends to and learns: attention, rollout, embeddings, Grad-CAM, curves.

Computation lives in `attention`, `embeddings`, `gradcam` and `curves`;
`figures` draws their results as PNGs; `python -m vit_jax_ft.explain` is the CLI.
"""
