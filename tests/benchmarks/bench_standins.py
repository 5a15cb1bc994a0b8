"""Stand-ins for the benchmark harness's tests: a tiny registry model, so that the report runs end
to end in seconds."""


def tiny_model(name, num_classes=10, in_chans=1, fused=False, backend=None):
    """A two-stage AnyNet of a few thousand parameters, whatever `name` asks for."""
    from pyfast import models

    return models.model_entrypoint("anynet")(depths=(1, 1), widths=(8, 16), group_widths=8, stem_width=8,
                                             num_classes=num_classes, in_chans=in_chans, fused=fused,
                                             backend=backend)
