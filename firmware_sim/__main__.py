"""`python -m firmware_sim fleet|field-devices|modbus-box|alpha-sign|coap-sensor …`: simulated devices."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from firmware_sim import alpha_sign, claim, coap_sensor, field_devices, fleet, modbus_box

MODBUS_BOX_COMMAND = "modbus-box"
ALPHA_SIGN_COMMAND = "alpha-sign"
COAP_SENSOR_COMMAND = "coap-sensor"
FIELD_DEVICES_COMMAND = "field-devices"
_USAGE = """usage: python -m firmware_sim COMMAND [OPTIONS]

commands:
  fleet       run simulated smart-radio speakers and LED screens (python -m firmware_sim fleet --help)
  field-devices  simulate the registered Modbus boxes, CoAP sensors and serial signs (… field-devices --help)
  modbus-box  run a simulated Modbus amplifier I/O box with sensors (python -m firmware_sim modbus-box --help)
  alpha-sign  run a simulated serial LED sign (Alpha protocol) on a pty and/or TCP (… alpha-sign --help)
  coap-sensor run a simulated CoAP sensor (water level, rainfall, air quality) (… coap-sensor --help)
  claim       a device with only a factory secret claims itself (python -m firmware_sim claim --help)
"""


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command, options = (arguments[0], arguments[1:]) if arguments else ("", [])
    if command == "fleet":
        return fleet.main(options)
    if command == fleet.WORKER_COMMAND:
        return fleet.worker_main(options)
    if command == MODBUS_BOX_COMMAND:
        return modbus_box.main(options)
    if command == ALPHA_SIGN_COMMAND:
        return alpha_sign.main(options)
    if command == COAP_SENSOR_COMMAND:
        return coap_sensor.main(options)
    if command == "claim":
        return claim.main(options)
    if command == FIELD_DEVICES_COMMAND:
        return field_devices.main(options)
    sys.stderr.write(_USAGE)
    return 0 if command in {"-h", "--help"} else 2


if __name__ == "__main__":
    sys.exit(main())
