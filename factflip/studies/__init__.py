"""Studies: one package per paper on the study platform (`platform`: the registry and the
driver; `stages`: fingerprinted stages; `schema`: the keys every config has; `sources`: facts
and base models; `report`: the page every study writes), and the suite that runs them
together."""
