"""The loss laws, by one name (METHOD.md sections 2, 3, 3b and 3c): what the rest of the package
and users read them by. The registry is law/form.py, the fitter law/fitter.py, the paper's
forms (tokens per parameter byte, the closed-form f*(S), Chinchilla, the QAT law) law/paper.py,
the schedule-aware ones law/sched.py and law/wsd.py, the runs tables law/runs.py; the
planner's questions law/planner.py and the law's plots law/plots.py. Importing this package
registers every built-in form.
"""

from qat_jax.law.fitter import bootstrap_intervals, fit  # noqa: F401
from qat_jax.law.form import (  # noqa: F401
    FORMS,
    FP_BITS,
    FP_COOLDOWN,
    LN2,
    Form,
    Law,
    default_cooldown,
    get_form,
    load_law,
    predict,
    register,
)
from qat_jax.law.paper import (  # noqa: F401
    CHINCHILLA_GRID,
    CLOSED_FORM_A,
    QAT_PARAMS,
    QAT_START_RANGES,
    S_FP_FLOOR,
    chinchilla,
    closed_form_fraction,
    qat,
    qat_form,
    tokens_per_param_byte,
)
from qat_jax.law.runs import (  # noqa: F401
    BYTES,
    COLUMNS,
    CONTROL,
    COOL,
    OPTIONAL,
    LawError,
    Runs,
    param_bytes,
    read_runs,
)
from qat_jax.law.sched import (  # noqa: F401
    GAINS,
    PENALTIES,
    QAT_SCHED_PARAMS,
    TRAINED_PARAMS,
    chinchilla_schedule,
    qat_schedule,
    qat_schedule_form,
    sched_fp_form,
)
from qat_jax.law.wsd import (  # noqa: F401
    QAT_WSD_PARAMS,
    chinchilla_wsd,
    qat_wsd,
    qat_wsd_form,
)
