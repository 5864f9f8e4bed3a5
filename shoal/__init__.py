"""The ``shoal`` command: the composition root that joins the components."""
