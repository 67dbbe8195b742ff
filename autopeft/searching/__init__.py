"""Layer 5, search: the space (``space``), the searchers (``searchers``), Ray Tune (``tune``), MO-ASHA
(``scheduler``), the Pareto front (``pareto``), the run folder (``runs``), resuming and interrupting
(``resume``, ``interrupt``), one-shot and final training (``oneshot``, ``final``), MLflow
(``tracking``), live progress and the driver's heartbeat (``progress``, ``liveness``), the parameter
budget (``budget``) and the front's plot (``plots``). (Named ``searching`` because ``autopeft.search``
is the public function; its old name ``autopeft.hpo`` still imports it.)"""
