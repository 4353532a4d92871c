"""The model core: units and orders, unit layers, backbones, the DVN, costs and the plain twin."""
