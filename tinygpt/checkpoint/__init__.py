"""tinygpt files: the `.tinygpt` format (`format`), the framing all files share (`files`), swapped modules (`swaps`).

model = tinygpt.load("tiny.tinygpt")          # validated, never unpickled
tinygpt.save(model, "copy.tinygpt")            # atomic
"""

from tinygpt.checkpoint.files import (  # noqa: F401
    CheckpointError,
    OutputError,
    content_hash,
    load_matching,
    model_fingerprint,
    read_manifest,
    read_tensor_file,
    tensor_mismatch,
    write_tensor_file,
)
from tinygpt.checkpoint.format import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    OPTIM_PREFIX,
    RNG_PREFIX,
    Checkpoint,
    as_model,
    describe,
    load,
    load_optimizer_state,
    optimizer_state_dict,
    read_checkpoint,
    resumable_state,
    save,
)
from tinygpt.checkpoint.swaps import apply_surgery_record, register_swap, set_module, surgery_record  # noqa: F401
