"""medtl: reproducible transfer learning for medical image classification."""
import os

# Idle OpenMP threads sleep instead of spinning. With spinning threads, a machine whose cores are busy with
# other jobs ran 2-thread training 3-10x slower than 1 thread (docs/performance.md). OpenMP reads this once,
# when torch loads it, so it is set here, before any medtl module imports torch; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
