"""synth: closed-loop neural control image synthesis.

Data flows one way: recordings -> fitted surrogate -> synthesis -> stimulus set on
disk -> follow-up recording -> validation report.
"""

__version__ = "0.1.0"
