"""What a run does when it is not told: the one place the API, the command line, recipes and the engine take
their defaults from (a method's own group size, symmetry and options live on its quantizer; calibration
window counts on the calibration source: :func:`quantkit.calib.default_windows`)."""

METHOD = "gptq"
BITS = 4
NUMBER_FORMAT = "int"
CALIBRATION = "c4"
LAYOUT = "native"
DTYPE = "auto"  # the unquantized tensors keep the source's dtype
SEED = 0
TRUE_SEQUENTIAL = True
# The dtype calibration runs the blocks' forward passes in: float32, the same result on every machine; bfloat16
# (autocast) is faster where the hardware has it, the statistics and solves staying float32/float64.
FORWARD_DTYPE = "float32"
FORWARD_DTYPES = ("float32", "bfloat16")
BIT_CHOICES = (2, 3, 4, 8)  # the widths a mixed-bits allocation chooses from
# A routed expert that calibration sends fewer tokens than this is starved: its statistics come from every
# calibration token of its block instead (a forced pass), and the run lists it.
EXPERT_MIN_TOKENS = 128
# Routed experts are solved in batches (one batched sweep per group of their linears) whose float64 Hessians take
# at most this many bytes together; 1 solves them one at a time.
EXPERT_BATCH_BYTES = 1 << 30
# quantkit diagnose: held-out windows (count, tokens) the divergence is measured on, calibration windows whose
# inputs give the relative output errors, and the width a repair raises units to.
DIAGNOSE_HELDOUT = (4, 256)
DIAGNOSE_CALIBRATION = (16, 256)
REPAIR_BITS = 8
