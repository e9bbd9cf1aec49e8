"""The contract the builder, the model repository, the local mode and the operator share.

A leaf package: it imports none of the project's other packages, and all of them import it.
Its modules are the one home of each shared fact:

* :mod:`.vocabulary`: tasks, backends, precisions, architectures;
* :mod:`.versions`: the pinned Triton release, TensorRT version and image names;
* :mod:`.engine`: the engine inputs and the cache key computed from them;
* :mod:`.engine_io`: the text-generation engine's step tensors (engine format 2);
* :mod:`.layout`: the engine cache's folders and file names;
* :mod:`.model_info`: the ``model-info.json`` schema.
"""
