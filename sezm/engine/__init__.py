"""How the model's work is scheduled in evaluation, apart from what it computes: the chunk plans
(:mod:`sezm.engine.chunks`) and the streamed, recomputed edge and atom work with the policy that
sizes its chunks (:mod:`sezm.engine.stream`). The layers call :func:`~sezm.engine.stream.stream_edges`
and :func:`~sezm.engine.stream.stream_nodes`; without a chunk plan these run the plain path."""
