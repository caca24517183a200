"""Layer-wise lr decay: the scale of each ViT parameter equals decay ** (L + 1 - layer id)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from afm_jax.models.vit import VisionTransformer
from afm_jax.train.layer_decay import layer_id, lr_scale_tree, scale_updates_by_tree


def test_layer_ids_follow_the_beit_convention():
    assert layer_id(["encoder", "patch_embed", "proj", "kernel"], 12) == 0
    assert layer_id(["encoder", "cls_token"], 12) == 0
    assert layer_id(["encoder", "blocks", "0", "attn", "qkv", "kernel"], 12) == 1
    assert layer_id(["encoder", "blocks", "11", "mlp", "fc2", "bias"], 12) == 12
    assert layer_id(["encoder", "norm", "scale"], 12) == 13
    assert layer_id(["head", "kernel"], 12) == 13


def test_scales_and_updates_of_a_vit():
    vit = VisionTransformer("mu/8", img_size=16, rngs=nnx.Rngs(0), depth=3)
    params = nnx.state(vit, nnx.Param)
    decay, depth = 0.65, 3
    scales = lr_scale_tree(params, num_layers=depth, decay=decay, patch_embed_scale=0.2)
    flat = {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): s
        for path, s in jax.tree_util.tree_flatten_with_path(scales)[0]
    }
    by_name = {k.split("/value")[0]: v for k, v in flat.items()}
    assert np.isclose(by_name["patch_embed/proj/kernel"], decay**4 * 0.2)
    assert np.isclose(by_name["cls_token"], decay**4)
    assert np.isclose(by_name["blocks/0/attn/qkv/kernel"], decay**3)
    assert np.isclose(by_name["blocks/2/mlp/fc1/bias"], decay**1)
    assert np.isclose(by_name["norm/scale"], 1.0)

    grads = jax.tree.map(jnp.ones_like, params)
    tx = optax.chain(optax.sgd(1.0), scale_updates_by_tree(scales))
    updates, _ = tx.update(grads, tx.init(params), params)
    for u, s in zip(jax.tree.leaves(updates), jax.tree.leaves(scales)):
        np.testing.assert_allclose(np.asarray(u), -s * np.ones_like(u), rtol=1e-6)
