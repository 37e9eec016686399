"""Meta-training: truncated unrolls, PES / ES / truncated backprop, outer trainer.

    from lopt_fast.meta import (ConstantTruncationSchedule, VectorizedLOptTruncatedStep,
                                TruncatedPES, OuterTrainer, meta_train)

    step = VectorizedLOptTruncatedStep(task, lopt, ConstantTruncationSchedule(200),
                                       num_tasks=8, random_initial_iteration_offset=200)
    trainer = OuterTrainer([TruncatedPES(step, trunc_length=10)])
    result = meta_train(trainer, jax.random.key(0), num_steps=1000,
                        ckpt_path="runs/x/checkpoint.npz")
    save_theta("runs/x/theta.npz", result.state.theta)
"""

from lopt_fast.meta.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from lopt_fast.meta.es import TruncatedES
from lopt_fast.meta.estimator import (
    AntitheticEstimator,
    EstimatorOut,
    GradientEstimator,
    sample_perturbations,
)
from lopt_fast.meta.loop import ConfigMismatchError, MetaTrainResult, meta_train
from lopt_fast.meta.lopt_truncated_step import LOptUnrollState, VectorizedLOptTruncatedStep
from lopt_fast.meta.outer_trainer import MetaTrainState, OuterTrainer, default_outer_optimizer
from lopt_fast.meta.pes import PESWorkerState, TruncatedPES, compute_pes_grad
from lopt_fast.meta.sharding import local_tasks, task_mesh
from lopt_fast.meta.tbptt import TruncatedGrad
from lopt_fast.meta.truncated_step import TruncatedStep, UnrollOut
from lopt_fast.meta.truncation import (
    ConstantTruncationSchedule,
    LogUniformLengthSchedule,
    TruncationSchedule,
    TruncationState,
)

__all__ = [
    "ConfigMismatchError",
    "ConstantTruncationSchedule",
    "EstimatorOut",
    "AntitheticEstimator",
    "GradientEstimator",
    "LOptUnrollState",
    "LogUniformLengthSchedule",
    "MetaTrainResult",
    "MetaTrainState",
    "OuterTrainer",
    "PESWorkerState",
    "TruncatedES",
    "TruncatedGrad",
    "TruncatedPES",
    "TruncatedStep",
    "TruncationSchedule",
    "TruncationState",
    "UnrollOut",
    "VectorizedLOptTruncatedStep",
    "checkpoint_config",
    "compute_pes_grad",
    "default_outer_optimizer",
    "load_checkpoint",
    "local_tasks",
    "meta_train",
    "sample_perturbations",
    "save_checkpoint",
    "task_mesh",
]
