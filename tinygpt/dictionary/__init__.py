"""Sparse dictionaries: SAEs and transcoders on any hook point, max-activating examples, steering.

    from tinygpt.dictionary import train_sae, splice, evaluate_dictionary, build_feature_index, steer

    res = train_sae(model, hook="blocks.2.hook_resid_post", arch="topk", k=32, expansion=8, out="l2.sae")
    sae = res.dictionary                                   # or load_sae("l2.sae", model)
    with splice(model, sae, error_term=True):              # exact; latents are hook points of the model
        logits, cache = model.run_with_cache(tokens)
    cache["blocks.2.hook_resid_post.hook_sae_acts_post"]   # [batch, pos, d_sae]
    print(evaluate_dictionary(model, sae))                 # EV, L0, dead/dense, CE clean/spliced/zero, KL
    index = build_feature_index(model, sae)                # top contexts, quantiles, histograms, logit effects
    find_separating_latents(model, sae).best               # latents for "inside a speaker tag", by AUROC
    with steer(model, steering_vector(model, sae, latent=7), coeff=8.0):
        tinygpt.generate(model, "ROMEO:", 100)
    export_saelens(sae, "l2-saelens/"); import_saelens("l2-saelens/")

Module map: `modules` (the dictionaries), `activations` (hook checks, early-stopping forwards, the shuffled
stream), `trainer` (one dictionary's step), `train` (`train_sae`), `settings` (its settings and resume state),
`files` (`.sae`, SAELens layout), `splice`, `evaluate`, `features` (building the index), `index` (reading it),
`probe` (AUROC search), `steering`, `patching` (activation patching over latents). See docs/dictionaries.md.
A tools-layer package: imports model, data, checkpoint, sampling, inputs, errors, and `tinygpt.interp.patching`'s
result and metrics.
"""

from tinygpt.dictionary.activations import ActivationStream, check_hooks, hook_activations
from tinygpt.dictionary.errors import DictionaryError, DictionaryFileError, DictionaryMismatchError
from tinygpt.dictionary.evaluate import DictionaryEval, evaluate_dictionary
from tinygpt.dictionary.features import build_feature_index, load_feature_index
from tinygpt.dictionary.files import export_saelens, import_saelens, load_sae, save_sae
from tinygpt.dictionary.index import FeatureExample, FeatureIndex, FeatureReport
from tinygpt.dictionary.modules import (
    ARCHS,
    BatchTopKSAE,
    DictionaryConfig,
    JumpReLUSAE,
    ReLUSAE,
    SparseDictionary,
    TopKSAE,
    make_dictionary,
)
from tinygpt.dictionary.patching import (
    LatentDLAResult,
    LatentPatchingResult,
    attribute_latents,
    latent_logit_attribution,
    patch_latents,
)
from tinygpt.dictionary.probe import (
    SeparationResult,
    any_speaker_tag_labels,
    auroc,
    find_separating_latents,
    latents_for_text,
    latents_for_token,
    speaker_tag_labels,
)
from tinygpt.dictionary.splice import run_with_saes, splice
from tinygpt.dictionary.steering import Steering, SteeringVector, as_steering, steer, steering_vector
from tinygpt.dictionary.train import SAETrainResult, train_sae
from tinygpt.model import register_method
from tinygpt.sampling import register_intervention

register_method("saes", splice)  # `with model.saes(sae, error_term=True): ...`
register_intervention(as_steering, kind="steer")  # `tinygpt.generate(..., steer=vector)`

__all__ = [
    "ARCHS",
    "ActivationStream",
    "BatchTopKSAE",
    "DictionaryConfig",
    "DictionaryError",
    "DictionaryEval",
    "DictionaryFileError",
    "DictionaryMismatchError",
    "FeatureExample",
    "FeatureIndex",
    "FeatureReport",
    "JumpReLUSAE",
    "LatentDLAResult",
    "LatentPatchingResult",
    "ReLUSAE",
    "SAETrainResult",
    "SeparationResult",
    "SparseDictionary",
    "Steering",
    "SteeringVector",
    "TopKSAE",
    "any_speaker_tag_labels",
    "as_steering",
    "auroc",
    "build_feature_index",
    "check_hooks",
    "evaluate_dictionary",
    "export_saelens",
    "find_separating_latents",
    "hook_activations",
    "import_saelens",
    "latents_for_text",
    "latents_for_token",
    "load_feature_index",
    "load_sae",
    "make_dictionary",
    "attribute_latents",
    "latent_logit_attribution",
    "patch_latents",
    "run_with_saes",
    "save_sae",
    "speaker_tag_labels",
    "splice",
    "steer",
    "steering_vector",
    "train_sae",
]
