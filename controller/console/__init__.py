"""The web console (issue 7): server-rendered pages for ward staff, technicians and operators."""
